"""A real `ray start --head` on loopback with token authentication, and jobs sent to it with `zeray submit` and
with plain `ray job submit`, as the README shows them."""

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

import pytest

from tests.conftest import REPO, SECRETS, free_port, kill_tree, write_config

TOKEN = "zeray-submit-test-token-5d1f0a4c9e8b7a6f5e4d3c2b1a0f9e8d"
BIN = os.path.dirname(sys.executable)


def _env(token: str | None = TOKEN) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PATH"] = BIN + os.pathsep + env["PATH"]  # the job's `python` is this virtualenv's, as after `activate`
    if token:
        env["RAY_AUTH_TOKEN"] = token
    return env


class Head(NamedTuple):
    jobs: str  # the dashboard, where jobs are submitted
    client: str  # the Ray Client server, which drives the cluster from here
    gcs: str  # the head's own address, for a driver on this machine
    logs: str  # the head's session logs

    def client_server_errors(self) -> str:
        """The tails of the per-client servers' stderr logs: why a client connection failed, if one did."""
        tails = []
        for path in sorted(glob.glob(os.path.join(self.logs, "ray_client_server_*.err"))):
            with open(path, errors="replace") as f:
                tails.append(f"{os.path.basename(path)}: {f.read()[-1500:]}")
        return "\n".join(tails)


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """`ray start --head --block` with RAY_AUTH_MODE=token, dashboard on 127.0.0.1; killed with its processes after.

    Two Ray instances share this machine while it runs (the session's embedded one too). Ray's internal actors
    that look their cluster up (Train's placement-group cleaner) pick "the latest `ray start`" from
    /tmp/ray/ray_current_cluster: the head's own --temp-dir keeps that file for the embedded Ray, and RAY_ADDRESS
    in the head's environment points its own processes at it."""
    port, dashboard, client = free_port(), free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="zr-")  # short: Ray's socket paths live under it
    env = dict(_env(), RAY_AUTH_MODE="token", RAY_ADDRESS=f"127.0.0.1:{port}")
    log = open(tmp_path_factory.mktemp("head") / "head.log", "w")
    proc = subprocess.Popen(
        [
            os.path.join(BIN, "ray"),
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--num-cpus=4",
            f"--temp-dir={temp_dir}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            f"--ray-client-server-port={client}",
            f"--dashboard-agent-listen-port={free_port()}",
            "--disable-usage-stats",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=str(tmp_path_factory.getbasetemp()),
    )
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 90
    while True:  # up when the jobs API answers an authenticated request
        probe = subprocess.run(
            [os.path.join(BIN, "ray"), "job", "list", "--address", address],
            env=dict(_env(), RAY_AUTH_MODE="token"),
            capture_output=True,
            text=True,
        )
        if probe.returncode == 0:
            break
        assert proc.poll() is None and time.monotonic() < deadline, open(log.name).read()[-3000:]
        time.sleep(2)
    yield Head(
        jobs=address,
        client=f"ray://127.0.0.1:{client}",
        gcs=f"127.0.0.1:{port}",
        logs=os.path.join(temp_dir, "session_latest", "logs"),
    )
    kill_tree(proc)
    log.close()
    shutil.rmtree(temp_dir, ignore_errors=True)


def _tiny_config(tmp_path, artifacts, name, prepared: str | None = None) -> str:
    return write_config(
        tmp_path / f"{name}.yaml",
        name=name,
        storage=str(tmp_path / "runs"),
        data={"prepared": prepared}
        if prepared
        else {"train": artifacts["data"], "format": "messages", "max_length": 128},
        model={"name_or_path": artifacts["model"]},
        train={
            "num_workers": 2,
            "max_steps": 4,
            "micro_batch_size": 8,
            "eval_every": 4,
            "checkpoint_every": 4,
            "log_every": 2,
        },
    )


def _zeray(*args, env=None, cwd=REPO):
    return subprocess.run(
        [sys.executable, "-m", "zeray", *args], env=env or _env(), cwd=cwd, capture_output=True, text=True, timeout=900
    )


@pytest.mark.integration
@pytest.mark.slow
def test_zeray_submit_trains_on_the_head_and_returns_the_jobs_status(head, tmp_path, artifacts, prepared_data):
    config = _tiny_config(tmp_path, artifacts, "submitted", prepared_data)
    done = _zeray("submit", config, "--address", head.jobs, "--follow", "--", "zeray", "train", config)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "submitted job raysubmit_" in done.stdout and "succeeded" in done.stdout
    summary = json.load(open(tmp_path / "runs" / "submitted" / "summary.json"))
    assert summary["world_size"] == 2 and summary["steps"] == 4 and summary["eval_loss"] < summary["first_loss"]
    assert os.path.isfile(tmp_path / "runs" / "submitted" / "model" / "model.safetensors")

    # a user error inside the job comes back as the job's exit status 2, with its one-line reason in the log
    failing = _zeray(
        "submit",
        config,
        "--address",
        head.jobs,
        "--follow",
        "--",
        "zeray",
        "train",
        config,
        "name=too-big",
        "train.num_workers=64",
    )
    assert failing.returncode == 2, failing.stdout[-3000:]
    assert "error: train.num_workers=64 needs" in failing.stdout and "job raysubmit_" in failing.stdout


@pytest.mark.integration
@pytest.mark.slow
def test_plain_ray_job_submit_runs_zeray_from_the_project(head, tmp_path, artifacts):
    """The README's `ray job submit --working-dir . -- python -m zeray ...`: zeray's CLI runs from the uploaded
    project on the cluster. (What a job's `zeray train` trains is asserted on the `zeray submit` test's run: the
    same entrypoint in the same kind of job.)"""
    config = _tiny_config(tmp_path, artifacts, "plain")
    done = subprocess.run(
        [
            os.path.join(BIN, "ray"),
            "job",
            "submit",
            "--address",
            head.jobs,
            "--working-dir",
            ".",
            "--",
            "python",
            "-m",
            "zeray",
            "plan",
            config,
        ],
        env=dict(_env(), RAY_AUTH_MODE="token"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in done.stdout
    # the plan, printed by the job
    assert "<- configured" in done.stdout and "cheapest that fits: ZeRO" in done.stdout, done.stdout[-3000:]


@pytest.mark.integration
@pytest.mark.slow
def test_train_drives_the_cluster_from_here_through_ray_client(head, tmp_path, artifacts, prepared_data):
    """RAY_ADDRESS=ray://<head>:10001 zeray train ...: the driver runs here, Ray Data and Ray Train on the cluster."""
    config = _tiny_config(tmp_path, artifacts, "client", prepared_data)
    done = _zeray("train", config, env=dict(_env(), RAY_AUTH_MODE="token", RAY_ADDRESS=head.client))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + head.client_server_errors()
    assert f"zeray train: driving the cluster at {head.client}; the command runs there" in done.stdout
    assert "done in" in done.stdout  # the command's last line made it here
    summary = json.load(open(tmp_path / "runs" / "client" / "summary.json"))
    assert summary["world_size"] == 2 and summary["steps"] == 4 and summary["eval_loss"] < summary["first_loss"]

    # a user error on the cluster comes back as exit status 2, with its one-line reason
    refused = _zeray(
        "train",
        config,
        "name=too-big",
        "train.num_workers=64",
        env=dict(_env(), RAY_AUTH_MODE="token", RAY_ADDRESS=head.client),
    )
    assert refused.returncode == 2, refused.stdout[-3000:] + refused.stderr[-3000:] + head.client_server_errors()
    assert "error: train.num_workers=64 needs" in refused.stderr

    # workers that cannot be placed (another driver holds the CPUs they need) stop the run with the reason. (The
    # holder connects straight to the head: a Ray Client connection without a working_dir just before the run's,
    # which has one, made the head's server for the run's die as it started, a 45-s stall before zeray connected
    # again.)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time, ray; from ray.util.placement_group import placement_group; "
            "ray.init(sys.argv[1]); pg = placement_group([{'CPU': 2}]); ray.get(pg.ready()); "
            "print('held', flush=True); "
            "time.sleep(600)",
            head.gcs,
        ],
        env=dict(_env(), RAY_AUTH_MODE="token"),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        pending = _zeray(
            "train",
            config,
            "name=pending",
            "train.cpus_per_worker=1.5",
            "cluster.data_cpus=1",
            "cluster.placement_timeout_s=5",
            env=dict(_env(), RAY_AUTH_MODE="token", RAY_ADDRESS=head.client),
        )
    finally:
        holder.kill()
        holder.wait()
    assert pending.returncode == 2, pending.stdout[-3000:] + pending.stderr[-3000:] + head.client_server_errors()
    assert "error: the training workers could not be placed within cluster.placement_timeout_s=5s" in pending.stderr


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.reliability("bad input", "a project holding `.env`, credentials and keys, submitted")
def test_submit_uploads_the_project_but_not_its_secrets(head, tmp_path):
    project = tmp_path / "project"
    for part in ("core", "zeray", "cluster", "pipelines", "trainers", "tuning"):
        shutil.copytree(os.path.join(REPO, part), project / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(os.path.join(REPO, "pyproject.toml"), project)
    (project / "configs").mkdir()
    config = write_config(project / "configs" / "x.yaml", name="x", data={"train": "./data.jsonl"})
    (project / ".env").write_text("HF_TOKEN=hf_secret\n")
    (project / "configs" / "credentials.json").write_text("{}")
    (project / "keys").mkdir()
    (project / "keys" / "deploy.pem").write_text("-----BEGIN-----")
    (project / "runs" / "old").mkdir(parents=True)
    (project / "runs" / "old" / "big.bin").write_bytes(b"0" * 1000)
    check = (
        "import os, sys, zeray, trainers; left = [p for p in ('pyproject.toml', 'configs/x.yaml') "
        "if not os.path.exists(p)]; came = [p for p in ('.env', 'configs/credentials.json', 'keys/deploy.pem', "
        "'runs') if os.path.exists(p)]; print('missing', left, 'uploaded', came); sys.exit(3 if left or came "
        "else 0)"
    )
    # the submitter's environment holds credentials: none of them travels with the job
    done = _zeray(
        "submit",
        "configs/x.yaml",
        "--address",
        head.jobs,
        "--follow",
        "--",
        "python",
        "-c",
        check,
        env=dict(_env(), **{k: v for k, v in SECRETS.items() if k != "RAY_AUTH_TOKEN"}),
        cwd=str(project),
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "not uploaded (look like secrets): .env, configs/credentials.json, keys/deploy.pem" in done.stdout
    assert "missing [] uploaded []" in done.stdout
    job_id = re.search(r"submitted job (\S+) ", done.stdout).group(1)
    stored = subprocess.run(  # what the cluster keeps of the job, its runtime_env included
        [
            sys.executable,
            "-c",
            "import sys; from ray.job_submission import JobSubmissionClient as C; "
            "print(C(sys.argv[1]).get_job_info(sys.argv[2]).__dict__)",
            head.jobs,
            job_id,
        ],
        env=dict(_env(), RAY_AUTH_MODE="token"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "working_dir" in stored.stdout, stored.stderr[-3000:]
    assert [k for k, v in SECRETS.items() if v in stored.stdout] == []
    assert os.path.isfile(config)

    # the job's own exit status comes back
    failed = _zeray(
        "submit",
        "configs/x.yaml",
        "--address",
        head.jobs,
        "--follow",
        "--",
        "python",
        "-c",
        "import sys; sys.exit(3)",
        cwd=str(project),
    )
    assert failed.returncode == 3 and "failed" in failed.stdout


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("token", ["not-the-clusters-token-000000000000000000000", None])
@pytest.mark.reliability("bad input", "a submit with a wrong or missing cluster token")
def test_submit_without_the_clusters_token_is_a_clean_error(head, tmp_path, token):
    config = write_config(tmp_path / "x.yaml", name="x", data={"train": "./data.jsonl"})
    env = dict(_env(token), HOME=str(tmp_path))  # no ~/.ray/auth_token to fall back on
    done = _zeray("submit", config, "--address", head.jobs, "--", "true", env=env)
    assert (
        done.returncode == 2 and done.stderr.startswith("error: the cluster at ") and "refused the token" in done.stderr
    ), done.stderr
    assert "RAY_AUTH_TOKEN" in done.stderr and (token is None or token not in done.stderr + done.stdout)


def test_submit_errors_name_what_is_missing(tmp_path):
    config = write_config(tmp_path / "x.yaml", name="x", data={"train": "./data.jsonl"})
    no_cluster = _zeray("submit", config, "--", "true")
    assert no_cluster.returncode == 2
    assert "zeray submit needs a cluster: give --address http://<head>:8265" in no_cluster.stderr
    client_port = _zeray("submit", config, "--address", "ray://127.0.0.1:10001", "--", "true")
    assert client_port.returncode == 2 and "not to the ray:// client port" in client_port.stderr
    nobody = _zeray("submit", config, "--address", f"http://127.0.0.1:{free_port()}", "--", "true")
    assert nobody.returncode == 2 and "no Ray dashboard answers at" in nobody.stderr, nobody.stderr
    outside = _zeray("submit", config, "--address", f"http://127.0.0.1:{free_port()}")
    assert outside.returncode == 2 and "is outside the project" in outside.stderr
    not_submit = _zeray("train", config, "--", "true")
    assert not_submit.returncode == 2 and "only `zeray submit` takes a command after --" in not_submit.stderr


def test_job_command_and_runtime_env(tmp_path):
    from cluster.submit import dependencies, job_command, runtime_env

    assert job_command([], "configs/x.yaml") == "python -m zeray train configs/x.yaml"
    assert job_command([], "x.yaml", ["train.lr=1e-4"]) == "python -m zeray train x.yaml train.lr=1e-4"
    assert (
        job_command(["zeray", "tune", "c y.yaml", "--resume"], "ignored") == "python -m zeray tune 'c y.yaml' --resume"
    )
    assert job_command(["bash", "-c", "echo hi"], "ignored") == "bash -c 'echo hi'"

    env = runtime_env(REPO, os.path.join(REPO, "runs-elsewhere"), install=False)
    assert env["working_dir"] == REPO and "pip" not in env
    assert {".venv", ".git", "runs", ".env", "*.pem", "credentials*", "runs-elsewhere"} <= set(env["excludes"])
    assert "outside" not in " ".join(runtime_env(REPO, "/outside/runs", install=False)["excludes"])
    installed = runtime_env(REPO, "s3://bucket/runs", install=True)
    assert installed["pip"] == dependencies(REPO) and any(d.startswith("ray[") for d in installed["pip"])


def test_a_client_server_that_fails_to_start_is_tried_again_and_other_refusals_are_not(monkeypatch, capsys):
    """The head's per-client server can fail to start while the head deletes the working_dir package a client that
    just left used (ray-project/ray#19792); the connection is tried again. Any other refusal is the user's to see."""
    import ray

    from cluster import client

    calls = []

    # the two ways the head reports a client server that died as it started (both seen in CI)
    failures = [
        "Initialization failure from server:\nRuntimeError: Starting Ray client server failed. See "
        "ray_client_server_23003.err for detailed logs.",
        'Initialization failure from server:\nTraceback (most recent call last):\n  File "proxier.py", line 396, '
        "in start_specific_server\n    cmd = psutil_proc.cmdline()\npsutil.ZombieProcess: PID still exists but "
        "it's a zombie (pid=7282)",
    ]

    def init(**kwargs):
        calls.append(kwargs["address"])
        if len(calls) <= len(failures):
            raise ConnectionAbortedError(failures[len(calls) - 1])

    monkeypatch.setattr(ray, "init", init)
    client._connect("ray://head:10001", {}, pause_s=0)
    assert calls == ["ray://head:10001"] * 3
    assert "did not start (attempt 2 of 4)" in capsys.readouterr().err

    def refuse(**kwargs):
        calls.append(kwargs["address"])
        raise ConnectionAbortedError("Initialization failure from server: permission denied")

    calls.clear()
    monkeypatch.setattr(ray, "init", refuse)
    with pytest.raises(ConnectionAbortedError, match="permission denied"):
        client._connect("ray://head:10001", {}, pause_s=0)
    assert calls == ["ray://head:10001"]
