"""Multi-node runs on one machine with real Ray processes: an autoscaling cluster on Ray's fake provider that starts
with no worker nodes, grows for `zeray train` and shrinks back after it; a 3-node `ray.cluster_utils.Cluster`
(training workers spread over nodes, the storage check), a node removed mid-run (restart on what is left, resumed
from the last checkpoint to the same weights as the uninterrupted run); an elastic run that grows onto a node that
joins (to the same weights again).

Each cluster here runs beside the session's embedded Ray (and, under `-n 2`, the other pytest worker's). Ray's
internal actors that look up "their" cluster without RAY_ADDRESS (Train's placement-group cleaner) read the address
file of the latest cluster in their Ray temp dir: they would take another cluster's word that their controller is
gone and remove its workers' placement group. So each cluster's processes get RAY_ADDRESS pointing at their own GCS,
and each cluster writes its address file into a temp dir of its own (`ray start --temp-dir`, RAY_TMPDIR for a
`Cluster`; short: Ray's socket paths live under it)."""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import psutil
import pytest
import yaml

from tests.conftest import PACED, free_port, kill_tree, stop_cluster, write_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BIN = os.path.dirname(sys.executable)
# into the second epoch (27 steps each)
STEPS = 40
# Ray Train's own pace, a report every 2 s, for the elastic run: a node that joins at its step 5 is seen at the next
# look of Ray Data's autoscaling coordinator at the cluster (every 20 s), which the elastic policy goes by, and the
# run must still have steps to do with two workers after it restarts (at 1 s it ended first on a busy machine)
ELASTIC_PACE = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "2.0"}
# the autoscaling head is a `ray start` of its own: token auth on with a token of its own, passed to its clients
AUTH = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "zeray-multinode-test-token-8c1d2e3f4a5b6c7d8e9f0a1b2c3d4e5f"}


def _node_ip() -> str:
    from ray._private.services import get_node_ip_address

    return get_node_ip_address()


def _zeray(args: list[str], address: str, auth: dict | None = None, paced: bool = False) -> subprocess.CompletedProcess:
    env = dict(
        os.environ,
        RAY_ADDRESS=address,
        PATH=BIN + os.pathsep + os.environ["PATH"],
        **(auth or {}),
        **(PACED if paced else {}),
    )
    return subprocess.run([sys.executable, "-m", "zeray", *args], env=env, capture_output=True, text=True, timeout=1200)


def _config(tmp_path, artifacts, prepared, name, cluster=None, **train) -> str:
    return write_config(
        tmp_path / f"{name}.yaml",
        name=name,
        storage=str(tmp_path / "runs"),
        data={"prepared": prepared},  # the session's (the pipeline has tests of its own)
        model={"name_or_path": artifacts["model"]},
        train={
            "num_workers": 2,
            "max_steps": STEPS,
            "epochs": 2,
            "micro_batch_size": 8,
            "lr": 3.0e-3,
            "zero_stage": 3,
            "eval_every": 1000,
            "checkpoint_every": 4,
            "log_every": 2,
            "max_failures": 2,
            "placement_strategy": "SPREAD",
            **train,
        },
        cluster={"shared_storage": True, **(cluster or {})},
    )  # one machine: every "node" sees the same paths


def _metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture
def autoscaling_head(tmp_path_factory):
    """What `ray.cluster_utils.AutoscalingCluster(autoscaler_v2=True)` starts — a head with Ray's fake node
    provider, which launches and terminates real local raylets as the autoscaler decides — without its
    `ray stop --force` (it would stop every Ray on the machine), with the provider config written here and given to
    the autoscaler as the provider's defaults too (tests/fake_provider: the wheel lacks that file)."""
    from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID

    port = free_port()
    gcs = f"{_node_ip()}:{port}"
    config = {
        "cluster_name": "zeray-fake",
        "max_workers": 3,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 0.1,
        # nodes are local raylets: nothing to set up over ssh, no launch config to compare
        "provider": {
            "type": "fake_multinode",
            "gcs_address": gcs,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "launch_multiple": True,
            "head_node_id": FAKE_HEAD_NODE_ID,
        },
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "cpu2": {"resources": {"CPU": 2}, "node_config": {}, "min_workers": 0, "max_workers": 3},
        },
        "head_node_type": "ray.head.default",
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }
    root = tmp_path_factory.mktemp("autoscaling")
    with open(root / "cluster.yaml", "w") as f:
        yaml.safe_dump(config, f)
    temp_dir = tempfile.mkdtemp(prefix="zr-")
    # autoscaler v2, set up as AutoscalingCluster(autoscaler_v2=True) does: it tracks nodes by id (v1 matches idle
    # nodes by IP, which fake nodes do not have, so it never scales them down) and publishes the node types
    env = dict(
        os.environ,
        RAY_FAKE_CLUSTER="1",
        AUTOSCALER_UPDATE_INTERVAL_S="1",
        RAY_ADDRESS=gcs,
        RAY_enable_autoscaler_v2="1",
        RAY_CLOUD_INSTANCE_ID=FAKE_HEAD_NODE_ID,
        RAY_OVERRIDE_NODE_ID_FOR_TESTING=FAKE_HEAD_NODE_ID,
        PATH=BIN + os.pathsep + os.environ["PATH"],
        ZERAY_FAKE_PROVIDER_DEFAULTS=str(root / "cluster.yaml"),
        PYTHONPATH=os.pathsep.join(
            [os.path.join(os.path.dirname(__file__), "fake_provider"), os.environ.get("PYTHONPATH", "")]
        ),
        **AUTH,
    )
    log = open(root / "head.log", "w")
    head = subprocess.Popen(
        [
            os.path.join(BIN, "ray"),
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--num-cpus=0",
            f"--autoscaling-config={root / 'cluster.yaml'}",
            f"--temp-dir={temp_dir}",
            f"--dashboard-port={free_port()}",
            f"--ray-client-server-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            "--disable-usage-stats",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 90
        while _alive_nodes(gcs, AUTH) < 1:
            assert head.poll() is None and time.monotonic() < deadline, open(log.name).read()[-3000:]
            time.sleep(1)
        yield gcs
    finally:
        kill_tree(head)
        log.close()
        for proc in psutil.process_iter(["cmdline"]):  # fake nodes are the monitor's children; make sure
            if any(gcs in part for part in (proc.info["cmdline"] or [])):
                proc.kill()


def _alive_nodes(gcs: str, auth: dict) -> int:
    """Alive nodes of the cluster at `gcs`, asked of its GCS from a fresh process (this one has its own Ray)."""
    code = (
        "import ray._raylet as r, sys; c = r.GcsClient(address=sys.argv[1]); "
        "print(sum(1 for n in c.get_all_node_info(timeout=10).values() if n.state == 0))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, gcs], capture_output=True, text=True, timeout=60, env=dict(os.environ, **auth)
    )
    return int(out.stdout.strip()) if out.returncode == 0 and out.stdout.strip().isdigit() else 0


def test_autoscaling_cluster_grows_for_a_run_and_shrinks_after(autoscaling_head, tmp_path, artifacts, prepared_data):
    assert _alive_nodes(autoscaling_head, AUTH) == 1  # the head only, and it has no CPU for workers or data
    seen = {"max": 1}
    stop = threading.Event()

    def watch():
        while not stop.wait(1):
            seen["max"] = max(seen["max"], _alive_nodes(autoscaling_head, AUTH))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    config = _config(
        tmp_path, artifacts, prepared_data, "grown", max_steps=4, checkpoint_every=4, placement_strategy="PACK"
    )
    done = _zeray(["train", config, "cluster.placement_timeout_s=300"], autoscaling_head, AUTH)
    stop.set()
    watcher.join(timeout=30)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.load(open(tmp_path / "runs" / "grown" / "summary.json"))
    assert summary["steps"] == 4 and summary["world_size"] == 2
    assert seen["max"] >= 2, "the autoscaler never added a node"

    deadline = time.monotonic() + 120  # idle_timeout_minutes 0.1: idle worker nodes go within seconds
    while _alive_nodes(autoscaling_head, AUTH) > 1:
        assert time.monotonic() < deadline, "the idle worker nodes were not scaled down"
        time.sleep(2)


@pytest.fixture(scope="module")
def three_nodes():
    """A head and two worker nodes of 2 CPUs each, shared by the module's tests (the one that removes a node
    comes last of those that run on it)."""
    from ray.cluster_utils import Cluster

    port = free_port()
    address = f"{_node_ip()}:{port}"
    temp_dir = tempfile.mkdtemp(prefix="zr-")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_ADDRESS", address)  # inherited by every process of this cluster
        env.setenv("RAY_TMPDIR", temp_dir)  # its address file (the module's docstring)
        cluster = Cluster(
            initialize_head=True,
            connect=False,
            head_node_args={"num_cpus": 2, "gcs_server_port": port, "include_dashboard": False},
        )
        workers = [cluster.add_node(num_cpus=2) for _ in range(2)]
        cluster.wait_for_nodes()
        assert cluster.address == address
        yield cluster, workers
        stop_cluster(cluster)
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def straight(three_nodes, tmp_path_factory, artifacts, prepared_data):
    """An uninterrupted SPREAD run on the three nodes: the spread test's run, and the reference of the node-removal
    and the elastic runs."""
    cluster, _ = three_nodes
    root = tmp_path_factory.mktemp("straight")
    config = _config(root, artifacts, prepared_data, "straight")
    done = _zeray(["train", config], cluster.address)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {"root": root, "config": config, "done": done, "run_dir": root / "runs" / "straight"}


def test_workers_spread_over_nodes_and_local_storage_needs_declaring(three_nodes, straight):
    cluster, _ = three_nodes
    # the same config again, its storage declared node-local: refused before anything is written
    undeclared = _zeray(["train", straight["config"], "name=local", "cluster.shared_storage=false"], cluster.address)
    assert undeclared.returncode == 2, undeclared.stderr[-2000:]
    assert "error: storage: " in undeclared.stderr and "the cluster has 3 nodes" in undeclared.stderr
    assert "cluster.shared_storage: true" in undeclared.stderr
    assert not os.path.exists(straight["root"] / "runs" / "local")

    assert f"Ray cluster at {cluster.address}" in straight["done"].stdout
    summary = json.load(open(straight["run_dir"] / "summary.json"))
    assert summary["world_size"] == 2 and summary["nodes"] == 2 and summary["steps"] == STEPS


def _raylet_pid(node) -> int:
    from ray._private import ray_constants

    return node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid


def _remove_a_training_node_when(cluster, nodes, run_dir, min_step, done: dict):
    """Remove (kill) a worker node that hosts a training worker once the run has logged `min_step`."""
    deadline = time.monotonic() + 900
    raylets = {_raylet_pid(node): node for node in nodes}
    while time.monotonic() < deadline:
        try:
            steps = [r["step"] for r in _metrics(run_dir) if "loss" in r]
        except (FileNotFoundError, json.JSONDecodeError):
            steps = []
        if steps and steps[-1] >= min_step:
            for proc in psutil.process_iter(["cmdline", "ppid"]):
                if (
                    any("RayTrainWorker" in part for part in (proc.info["cmdline"] or []))
                    and proc.info["ppid"] in raylets
                ):
                    done["step"] = steps[-1]
                    cluster.remove_node(raylets[proc.info["ppid"]], allow_graceful=False)
                    done["removed"] = True
                    return
        time.sleep(0.05)


@pytest.mark.reliability("fault", "a worker node removed from a 3-node cluster mid-run")
def test_node_removed_mid_run_restarts_on_the_rest_and_resumes_exactly(
    three_nodes, straight, tmp_path, artifacts, prepared_data
):
    from safetensors.torch import load_file

    cluster, workers = three_nodes

    run_dir = str(tmp_path / "runs" / "lost-node")
    done: dict = {}
    remover = threading.Thread(
        target=_remove_a_training_node_when, args=(cluster, workers, run_dir, 9, done), daemon=True
    )
    remover.start()
    interrupted = _zeray(
        ["train", _config(tmp_path, artifacts, prepared_data, "lost-node")], cluster.address, paced=True
    )
    remover.join(timeout=30)
    assert done.get("removed"), "no node was removed: the run finished before step 9 was logged"
    assert interrupted.returncode == 0, interrupted.stdout[-3000:] + interrupted.stderr[-3000:]
    assert done["step"] < STEPS
    resumed = re.search(r"resumed from checkpoint at step (\d+)", interrupted.stdout + interrupted.stderr)
    assert resumed, interrupted.stdout[-3000:]
    at = int(resumed.group(1))
    assert 0 < at < STEPS and at % 4 == 0  # a checkpoint of the first attempt

    rows = [r for r in _metrics(run_dir) if "loss" in r]
    steps = [r["step"] for r in rows]
    # the first attempt logged every other step up to its checkpoint or past it; the restart went on from there
    after = list(range(at + 2, STEPS + 1, 2))
    before = steps[: len(steps) - len(after)]
    assert steps[len(before) :] == after and before == list(range(2, before[-1] + 1, 2)) and before[-1] >= at, steps
    reference = {r["step"]: r["loss"] for r in _metrics(straight["run_dir"]) if "loss" in r}
    for row in rows:
        assert row["loss"] == pytest.approx(reference[row["step"]], abs=1e-5), row["step"]
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert summary["steps"] == STEPS and summary["world_size"] == 2
    a = load_file(str(straight["run_dir"] / "model" / "model.safetensors"))
    b = load_file(os.path.join(run_dir, "model", "model.safetensors"))
    for key in a:
        assert (a[key] - b[key]).abs().max().item() <= 1e-6, key


@pytest.fixture
def one_worker_node(monkeypatch):
    """A head with room for one 2-CPU training worker beside Ray Data's CPU, and nothing else (yet)."""
    from ray.cluster_utils import Cluster

    port = free_port()
    monkeypatch.setenv("RAY_ADDRESS", f"{_node_ip()}:{port}")
    temp_dir = tempfile.mkdtemp(prefix="zr-")
    monkeypatch.setenv("RAY_TMPDIR", temp_dir)  # its address file (the module's docstring)
    cluster = Cluster(
        initialize_head=True,
        connect=False,
        head_node_args={"num_cpus": 3, "gcs_server_port": port, "include_dashboard": False},
    )
    cluster.wait_for_nodes()
    yield cluster
    stop_cluster(cluster)
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.reliability("fault", "a node joining an elastic run mid-run (the workers grow from 1 to 2)")
def test_elastic_run_grows_onto_a_new_node_with_the_loss_of_a_fixed_run(
    one_worker_node, straight, tmp_path, artifacts, prepared_data
):
    """An elastic [1, 2] ZeRO-3 run starts with the one worker the cluster holds, grows to two when a node arrives
    (restarting from its last checkpoint, written by one worker and converted to DeepSpeed's universal checkpoint),
    and every loss it logged, and its final weights, are those of the fixed 2-worker `straight` run (its 2-CPU
    workers PACKed here, Ray Data on 1 CPU): the global batch is two workers' micro-batches throughout."""
    from safetensors.torch import load_file

    cluster = one_worker_node
    run_dir = str(tmp_path / "runs" / "elastic")
    config = _config(
        tmp_path,
        artifacts,
        prepared_data,
        "elastic",
        cluster={"data_cpus": 1},
        num_workers=[1, 2],
        elastic_resize_s=2,
        cpus_per_worker=2,
        placement_strategy="PACK",
    )
    with open(tmp_path / "elastic.log", "w+") as out:
        run = subprocess.Popen(
            [sys.executable, "-m", "zeray", "train", config],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(
                os.environ, RAY_ADDRESS=cluster.address, PATH=BIN + os.pathsep + os.environ["PATH"], **ELASTIC_PACE
            ),
        )
        # once it has logged step 5 (past its first checkpoint) on one worker: a 2-CPU node joins
        # (Cluster.add_node must run on the main thread)
        deadline, rows = time.monotonic() + 900, []
        while run.poll() is None and time.monotonic() < deadline and not (rows and rows[-1]["step"] >= 5):
            time.sleep(0.05)
            try:
                rows = [r for r in _metrics(run_dir) if "loss" in r]
            except (FileNotFoundError, json.JSONDecodeError):
                rows = []
        assert rows and rows[-1]["world_size"] == 1, "the run did not start with the one worker the cluster held"
        cluster.add_node(num_cpus=2)
        code = run.wait(timeout=900)
        out.seek(0)
        log = out.read()
    assert code == 0, log[-3000:]
    assert "plan: 1-2 (elastic) workers" in log
    assert "the checkpoint was written by 1 workers, this run has 2: converting it" in log

    rows = [r for r in _metrics(run_dir) if "loss" in r]
    assert {r["world_size"] for r in rows} == {1, 2} and rows[-1]["world_size"] == 2
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert summary["steps"] == STEPS and summary["world_size"] == 2

    reference = {r["step"]: r["loss"] for r in _metrics(straight["run_dir"]) if "loss" in r}
    assert {r["step"] for r in rows} <= set(reference)
    # one worker accumulating both micro-batches = two workers averaging theirs
    for r in rows:
        assert r["loss"] == pytest.approx(reference[r["step"]], abs=1e-6), (r["step"], r["world_size"])
    a = load_file(str(straight["run_dir"] / "model" / "model.safetensors"))
    b = load_file(os.path.join(run_dir, "model", "model.safetensors"))
    for key in a:
        assert (a[key] - b[key]).abs().max().item() <= 1e-6, key
