"""Security defaults that must not drift: remote code off, the embedded dashboard on loopback, Ray's token
authentication left as Ray sets it."""

import os

import pytest

from cluster.config import ClusterConfig
from cluster.local import PREEMPTION_WATCHER, ray_session
from zeray.config import load_config


@pytest.mark.reliability("bad input", "a model that needs remote code, without `trust_remote_code`")
def test_a_model_that_brings_its_own_code_is_refused_unless_trusted(artifacts, tmp_path, capsys):
    """A model folder whose config names code of its own (`auto_map`): every command refuses it in one line
    before that code runs; with the config's (or generate's) consent it loads."""
    import json
    import shutil

    from conftest import write_config

    from zeray.cli import main

    model = tmp_path / "custom-model"
    shutil.copytree(artifacts["model"], model)
    config = json.loads((model / "config.json").read_text())
    config.update(
        model_type="zeray_custom",
        auto_map={"AutoConfig": "custom.CustomConfig", "AutoModelForCausalLM": "custom.CustomForCausalLM"},
    )
    (model / "config.json").write_text(json.dumps(config))
    (model / "custom.py").write_text(  # leaves a mark when it runs
        f"import pathlib\npathlib.Path({str(tmp_path / 'RAN')!r}).write_text('remote code ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'zeray_custom'\n"
        "class CustomForCausalLM(LlamaForCausalLM):\n    config_class = CustomConfig\n"
    )
    path = write_config(tmp_path / "c.yaml", data={"train": artifacts["data"]}, model={"name_or_path": str(model)})
    capsys.readouterr()
    for command in (
        ["train", path],
        ["prep", path],
        ["plan", path],
        ["eval", path, "--model", str(model)],
        ["generate", str(model), "--prompt", "hi"],
    ):
        assert main(command) == 2, command
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and "custom.py" in err, err
        assert ("model.trust_remote_code: true" if command[0] != "generate" else "--trust-remote-code") in err
    assert not (tmp_path / "RAN").exists()
    assert load_config(path, [], check_paths=False).model.trust_remote_code is False
    assert load_config(path, ["model.trust_remote_code=true"]).model.trust_remote_code is True
    # trusted: the folder's own code runs and gives its model
    assert main(["generate", str(model), "--prompt", "hi", "--max-new-tokens", "2", "--trust-remote-code"]) == 0
    assert (tmp_path / "RAN").read_text() == "remote code ran"


@pytest.mark.parametrize("address", [None, "ray://head:10001"])
def test_embedded_ray_binds_the_dashboard_to_loopback_and_keeps_auth(monkeypatch, address):
    import ray

    calls = []
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    own = ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT")
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append((kwargs, {k: os.environ.get(k) for k in own})))
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.delenv(PREEMPTION_WATCHER, raising=False)
    with ray_session(ClusterConfig(address=address), train_cpus=2):
        pass
    ((kwargs, env),) = calls
    if address:
        assert kwargs["address"] == address and "dashboard_host" not in kwargs
        assert PREEMPTION_WATCHER not in os.environ  # a cluster's nodes may be drained: Ray Train watches
        assert env == {"RAY_ADDRESS": None, "RAY_GCS_SERVER_PORT": None}
    else:  # a Ray of its own, even where a `ray start` cluster runs on this machine (Ray would join that one)
        assert kwargs["dashboard_host"] == "127.0.0.1" and kwargs["address"] == "local"
        assert os.environ[PREEMPTION_WATCHER] == "0"  # one machine: no drain to watch for
        # its processes start knowing its address (its GCS's port), and only they: the command's own are as before
        assert env["RAY_ADDRESS"] == f"{ray.util.get_node_ip_address()}:{env['RAY_GCS_SERVER_PORT']}"
        assert int(env["RAY_GCS_SERVER_PORT"]) > 0 and not any(key in os.environ for key in own)
    # nothing zeray passes or sets turns Ray's token authentication off
    assert not any("auth" in key.lower() for key in kwargs)
    assert "RAY_AUTH_MODE" not in os.environ


@pytest.mark.reliability("bad input", "credentials inside `train.mlflow_uri`")
def test_credentials_in_the_mlflow_uri_are_refused_without_echoing_them(artifacts, tmp_path, capsys):
    from conftest import write_config

    from zeray.cli import main

    config = write_config(
        tmp_path / "c.yaml", data={"train": artifacts["data"]}, model={"name_or_path": artifacts["model"]}
    )
    for uri in ("https://bob:hunter2@mlflow.example.com", "https://hunter2@mlflow.example.com"):
        assert main(["train", config, f"train.mlflow_uri={uri}"]) == 2
        err = capsys.readouterr().err
        assert "train.mlflow_uri" in err and "MLFLOW_TRACKING_PASSWORD" in err and "hunter2" not in err
    assert load_config(config, ["train.mlflow_uri=https://mlflow.example.com"]).train.mlflow_uri
