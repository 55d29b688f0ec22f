"""Security defaults that must not drift: remote code off, the embedded dashboard on loopback, Ray's token
authentication left as Ray sets it."""

import os

import pytest
from conftest import SECRETS

from cluster.config import ClusterConfig
from cluster.local import ray_session
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
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    with ray_session(ClusterConfig(address=address), train_cpus=2):
        pass
    (kwargs,) = calls
    if address:
        assert kwargs["address"] == address and "dashboard_host" not in kwargs
    else:  # a Ray of its own, even where a `ray start` cluster runs on this machine (Ray would join that one)
        assert kwargs["dashboard_host"] == "127.0.0.1" and kwargs["address"] == "local"
    # nothing zeray passes or sets turns Ray's token authentication off
    assert not any("auth" in key.lower() for key in kwargs)
    assert "RAY_AUTH_MODE" not in os.environ


def leaks(root: str) -> list[str]:
    """Files under `root` (any kind: logs, JSON, Parquet, weights, checkpoints) holding a secret's value."""
    found = []
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            try:
                with open(path, "rb") as f:
                    content = f.read()
            except OSError:  # sockets, files gone while walking
                continue
            found += [f"{path}: {key}" for key, value in SECRETS.items() if value.encode() in content]
    return found


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.reliability(
    "bad input",
    "secrets (HF_TOKEN, WANDB_API_KEY, AWS_*, RAY_AUTH_TOKEN) in the environment "
    "of `zeray prep`, `train`, `eval` and `export`",
)
def test_secrets_in_the_environment_reach_no_log_output_or_dump(artifacts, tmp_path):
    """The whole run (prep, train with checkpoints and export, eval, export again) with secrets in its environment,
    on its own embedded Ray whose session logs are kept: no secret's value in the console, the run directory (config
    and summary dumps, metrics, prepared data, checkpoints, model) or any Ray log of the session."""
    import re
    import shutil
    import subprocess
    import sys
    import tempfile

    from conftest import REPO, write_config

    ray_tmp = tempfile.mkdtemp(prefix="zr-")  # short: Ray's socket paths live under it
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(SECRETS, RAY_TMPDIR=ray_tmp)
    config = write_config(
        tmp_path / "secret.yaml",
        name="secret",
        storage=str(tmp_path / "runs"),
        data={"train": artifacts["data"], "format": "messages", "max_length": 96},
        model={"name_or_path": artifacts["model"]},
        train={
            "num_workers": 2,
            "max_steps": 4,
            "micro_batch_size": 8,
            "zero_stage": 2,
            "eval_every": 2,
            "checkpoint_every": 2,
            "log_every": 1,
        },
    )
    run = tmp_path / "runs" / "secret"
    console = []
    try:
        for command in (
            ["prep", config],
            ["train", config],
            ["eval", config, "--model", str(run / "model")],
            ["export", str(run), "--out", str(run / "exported")],
        ):
            done = subprocess.run(
                [sys.executable, "-m", "zeray", *command],
                cwd=REPO,
                env=env,
                capture_output=True,
                text=True,
                timeout=900,
            )
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
            console.append(done.stdout + done.stderr)
        assert (run / "summary.json").is_file() and (run / "config.json").is_file()
        assert any((run / "data").glob("train/*.parquet")) and (run / "model" / "model.safetensors").is_file()
        assert [key for key, value in SECRETS.items() if any(value in text for text in console)] == []
        assert leaks(str(run)) == []
        logs = [os.path.join(d, f) for d, _, files in os.walk(ray_tmp) for f in files if d.endswith("logs")]
        assert len(logs) > 10, "Ray's session logs were not where RAY_TMPDIR puts them"
        assert leaks(ray_tmp) == []
        # each command's embedded Ray served its dashboard on loopback only (Ray's own account of where it bound)
        binds = [
            re.search(r"Dashboard head http address: (\S+)", open(path, errors="replace").read())
            for path in logs
            if os.path.basename(path) == "dashboard.log"
        ]
        assert len(binds) >= 3 and all(b and b.group(1).startswith("127.0.0.1:") for b in binds), binds
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


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
