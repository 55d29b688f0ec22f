"""The cluster configs that ship in cluster/: the launcher YAMLs validate against the schema that ships with Ray, the
KubeRay manifests translate (with Ray's own KubeRay translator) into an autoscaling config that validates too, and
every command they run is one zeray accepts."""

import copy
import json
import os
import re
import shlex

import jsonschema
import pytest
import ray
import ray.autoscaler
import tomllib
import yaml
from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
from ray.autoscaler._private.util import prepare_config, validate_config

from tests.conftest import REPO
from zeray.config import load_config

CLUSTER = os.path.join(REPO, "cluster")


def _load(*parts):
    with open(os.path.join(CLUSTER, *parts)) as f:
        return yaml.safe_load(f)


@pytest.mark.parametrize("name", ["aws", "gcp"])
def test_launcher_configs_validate_against_rays_schema(name):
    config = _load("launcher", f"{name}.yaml")
    with open(os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")) as f:
        jsonschema.validate(config, json.load(f))  # the file as written
    validate_config(prepare_config(copy.deepcopy(config)))  # merged with the provider's defaults, as `ray up` does

    types = config["available_node_types"]
    head, gpu = types[config["head_node_type"]], types["gpu"]
    assert gpu["min_workers"] == 0 and 0 < gpu["max_workers"] <= config["max_workers"]
    assert config["idle_timeout_minutes"] > 0
    assert "GPU" not in head["resources"]
    if name == "gcp":  # GCP does not report instance resources: the declared ones must match the machine type
        assert gpu["resources"] == {"CPU": 12, "GPU": 1} and gpu["node_config"]["machineType"] == "g2-standard-12"
    assert config["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"

    # token auth on every node, the same token everywhere, the dashboard on the head's loopback only
    head_start = " ".join(config["head_start_ray_commands"])
    assert "RAY_AUTH_MODE=token ray start --head" in head_start and "--dashboard-host=127.0.0.1" in head_start
    assert "RAY_AUTH_MODE=token ray start --address" in " ".join(config["worker_start_ray_commands"])
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    # the project goes to every node and is installed there, without its environment, outputs or secrets
    assert config["file_mounts"]["~/zeray"] == "." and "pip install --quiet -e ~/zeray" in config["setup_commands"]
    for never in (".venv", ".git", "runs", ".env", "*.pem"):
        assert never in config["rsync_exclude"]


def _kuberay_autoscaling(cluster_spec: dict, name: str) -> dict:
    return _derive_autoscaling_config_from_ray_cr(
        {"metadata": {"name": name, "namespace": "default"}, "spec": cluster_spec}
    )


def _pvc_claims(cluster_spec: dict) -> set[str]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    return {
        v["persistentVolumeClaim"]["claimName"]
        for g in groups
        for v in g["template"]["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    }


@pytest.mark.parametrize("manifest", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_manifests_are_autoscaling_gpu_clusters_with_token_auth(manifest):
    doc = _load("kuberay", manifest)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == (
        "RayCluster" if manifest == "raycluster.yaml" else "RayJob"
    )
    spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
    assert spec["rayVersion"] == ray.__version__ and spec["authOptions"] == {"mode": "token"}
    assert spec["enableInTreeAutoscaling"] is True

    # Ray's own translation of the manifest into the autoscaler's config, validated against its schema
    autoscaling = _kuberay_autoscaling(spec, doc["metadata"]["name"])
    types = autoscaling["available_node_types"]
    gpu = types["gpu"]
    assert gpu["resources"]["GPU"] == 1 and gpu["resources"]["CPU"] == 8
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 4
    assert "GPU" not in types["headgroup"]["resources"] and types["headgroup"]["resources"]["CPU"] == 4
    assert autoscaling["idle_timeout_minutes"] > 0

    # every pod runs the image built from cluster/Dockerfile and mounts the shared volume of storage.yaml
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    images = {c["image"] for g in groups for c in g["template"]["spec"]["containers"]}
    assert len(images) == 1
    claim = _load("kuberay", "storage.yaml")
    assert claim["kind"] == "PersistentVolumeClaim" and claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert _pvc_claims(spec) == {claim["metadata"]["name"]}
    mounts = {m["mountPath"] for g in groups for c in g["template"]["spec"]["containers"] for m in c["volumeMounts"]}
    assert "/mnt/zeray" in mounts and "/dev/shm" in mounts


def test_rayjob_entrypoint_is_a_valid_zeray_train_on_the_shared_volume():
    doc = _load("kuberay", "rayjob.yaml")
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[:4] == ["python", "-m", "zeray", "train"]
    cfg = load_config(os.path.join(REPO, argv[4]), argv[5:], check_paths=False)
    assert cfg.storage == "/mnt/zeray/runs" and cfg.cluster.shared_storage and cfg.train.use_gpu is True
    assert doc["spec"]["shutdownAfterJobFinishes"] is True


def test_dockerfile_copies_what_exists_and_uses_the_tested_ray():
    with open(os.path.join(CLUSTER, "Dockerfile")) as f:
        text = f.read()
    assert re.search(r"^FROM rayproject/ray:" + re.escape(ray.__version__) + "-py311-gpu$", text, re.M)
    sources = [part for line in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", text, re.M) for part in line.split()]
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        packages = tomllib.load(f)["tool"]["setuptools"]["packages"]
    assert {*packages, "pyproject.toml"} <= set(sources)  # every package zeray installs
    for source in sources:
        assert os.path.exists(os.path.join(REPO, source)), source
    assert ".venv" not in text and "COPY . " not in text
