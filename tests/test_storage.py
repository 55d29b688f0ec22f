"""`storage` in an object store: prep, train, resume and export against a real S3 endpoint (moto's server on
loopback), with credentials and endpoint only in the environment, the way a cluster's nodes get them."""

import csv
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest
from conftest import SECRETS, free_port, secrets_in, write_config

BUCKET = "zeray-test"


@pytest.fixture(scope="module")
def s3():
    """An S3 endpoint with one bucket; yields the environment a zeray process needs to reach it."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "zeraytest",
        "AWS_SECRET_ACCESS_KEY": "zeraytest",
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id="zeraytest",
        aws_secret_access_key="zeraytest",
        region_name="us-east-1",
    ).create_bucket(Bucket=BUCKET)
    yield env
    server.stop()


def bucket_fs(env):
    import pyarrow.fs as pafs

    return pafs.S3FileSystem(
        endpoint_override=env["AWS_ENDPOINT_URL"],
        access_key=env["AWS_ACCESS_KEY_ID"],
        secret_key=env["AWS_SECRET_ACCESS_KEY"],
        region=env["AWS_REGION"],
    )


def listing(fs, path) -> dict[str, int]:
    from core.fs import files

    return files(fs, path)


def schedule(lr: float, steps: int) -> list[float]:
    """The rate of each step under the default cosine schedule and warmup (train.warmup_ratio's default)."""
    import torch
    from transformers import get_scheduler

    from trainers.config import TrainConfig

    warmup = int(TrainConfig().warmup_ratio * steps)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=warmup, num_training_steps=steps)
    rates = []
    for _ in range(steps):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return rates


def read_json_lines(fs, path) -> list[dict]:
    from core.fs import read_bytes

    return [json.loads(line) for line in read_bytes(fs, path).decode().splitlines() if line.strip()]


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.reliability(
    "bad input",
    "secrets (HF_TOKEN, WANDB_API_KEY, AWS_*, RAY_AUTH_TOKEN) in the environment "
    "of `zeray prep`, `train`, `eval` and `export`",
)
def test_a_run_lives_in_the_object_store_prepped_trained_resumed_and_exported(s3, artifacts, tmp_path):
    """The whole run in the bucket: prep, train with checkpoints and export, the same command resumed, `zeray
    export` and `eval` of the exported model. With secrets in the environment (the object store's credentials among
    them), on embedded Rays whose session logs are kept: no secret's value in the console, the run in the bucket
    (config and summary dumps, metrics, prepared data, checkpoints, model), the local files or any Ray log."""
    import pyarrow.fs as pafs
    from safetensors.torch import load_file

    from core.fs import read_bytes

    ray_tmp = tempfile.mkdtemp(prefix="zr-")  # short: Ray's socket paths live under it
    staging = tmp_path / "tmp"  # the processes' temp dir: what they stage there must be gone when they end
    staging.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(s3, **SECRETS, RAY_TMPDIR=ray_tmp, TMPDIR=str(staging))  # (any credentials do for moto)
    run_uri = f"s3://{BUCKET}/runs/remote"
    config = write_config(
        tmp_path / "remote.yaml",
        name="remote",
        storage=f"s3://{BUCKET}/runs",
        data={"train": artifacts["data"], "format": "messages", "max_length": 96},
        model={"name_or_path": artifacts["model"]},
        train={
            "num_workers": 2,
            "max_steps": 6,
            "micro_batch_size": 8,
            "lr": 3.0e-3,
            "zero_stage": 2,
            "eval_every": 3,
            "checkpoint_every": 3,
            "log_every": 1,
        },
    )

    console = []

    def zeray(*command):
        done = subprocess.run(
            [sys.executable, "-m", "zeray", *command],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        console.append(done.stdout + done.stderr)
        return done.stdout

    fs, run = bucket_fs(s3), f"{BUCKET}/runs/remote"
    try:
        out = zeray("prep", config)
        data = listing(fs, f"{run}/data")
        report = json.loads(read_bytes(fs, f"{run}/data/report.json"))
        assert f"report: {run_uri}/data/report.json" in out
        assert report["records_in"] == report["records_out"] + sum(report["rejected"].values())
        assert any(name.startswith("train/") and name.endswith(".parquet") for name in data)
        rejects = read_bytes(fs, f"{run}/data/rejects.jsonl").decode().splitlines()
        assert len(rejects) == sum(report["rejected"].values()) > 0
        assert [
            e.base_name
            for e in fs.get_file_info(pafs.FileSelector(f"{BUCKET}/runs"))
            if ".tmp-" in e.base_name or ".old-" in e.base_name
        ] == []

        prepared = f"data.prepared={run_uri}/data"
        out = zeray("train", config, prepared)
        assert f"results in {run_uri}" in out and f"model in {run_uri}/model" in out
        summary = json.loads(read_bytes(fs, f"{run}/summary.json"))
        assert summary["steps"] == 6 and summary["model_dir"] == f"{run_uri}/model"
        assert summary["checkpoint"].startswith(f"{run_uri}/checkpoint_")
        first = read_json_lines(fs, f"{run}/metrics.jsonl")
        assert [r["step"] for r in first if "loss" in r] == [1, 2, 3, 4, 5, 6]
        assert [r["lr"] for r in first if "loss" in r] == pytest.approx(schedule(3.0e-3, 6))
        stored = listing(fs, run)
        assert {"config.json", "report.png", "model/model.safetensors", "model/tokenizer.json"} <= set(stored)
        assert json.loads(read_bytes(fs, f"{run}/config.json"))["storage"] == f"s3://{BUCKET}/runs"

        # the same command, longer: it resumes from the checkpoint in the bucket and its metrics continue
        out = zeray("train", config, prepared, "train.max_steps=12")
        assert f"resuming run remote from its checkpoints in {run_uri}" in out
        assert "resumed from checkpoint at step 6" in out
        rows = read_json_lines(fs, f"{run}/metrics.jsonl")
        assert [r["step"] for r in rows if "loss" in r] == list(range(1, 13))
        assert [r for r in rows if r.get("step", 0) <= 6 and "loss" in r] == [r for r in first if "loss" in r]
        assert json.loads(read_bytes(fs, f"{run}/summary.json"))["steps"] == 12
        # from step 7 on at the rate of the 12-step schedule, not the 6-step one the checkpoint's scheduler ran
        assert [r["lr"] for r in rows if r["step"] > 6 and "loss" in r] == pytest.approx(schedule(3.0e-3, 12)[6:])

        # `zeray export` of the run in the bucket: the same weights as the model the run wrote there
        local = tmp_path / "model.safetensors"
        local.write_bytes(read_bytes(fs, f"{run}/model/model.safetensors"))
        out = zeray("export", run_uri, "--out", str(tmp_path / "exported"))
        assert f"exported {run_uri}/checkpoint_" in out
        ours, theirs = load_file(tmp_path / "exported" / "model.safetensors"), load_file(local)
        assert ours.keys() == theirs.keys() and all((ours[k] == theirs[k]).all() for k in ours)
        # that model scores on the test split in the bucket what the run measured
        out = zeray("eval", config, prepared, "--model", str(tmp_path / "exported"))
        tested = json.loads(out[out.index("{") :])
        assert tested["test_loss"] == pytest.approx(json.loads(read_bytes(fs, f"{run}/summary.json"))["test_loss"])

        # a checkpoint cut short in the bucket (a shard lost) is passed over for the newest intact one
        checkpoints = sorted(
            e.path
            for e in fs.get_file_info(pafs.FileSelector(run))
            if e.base_name.startswith("checkpoint_") and e.type == pafs.FileType.Directory
        )
        newest = checkpoints[-1]
        shard = next(name for name in listing(fs, newest) if "optim_states" in name)
        fs.delete_file(f"{newest}/{shard}")
        out = zeray("export", run_uri, "--out", f"{run_uri}/exported-earlier")
        assert f"exported s3://{checkpoints[-2]}" in out
        assert "model.safetensors" in listing(fs, f"{run}/exported-earlier")
        assert [p.name for p in staging.iterdir() if p.name.startswith("zeray-")] == []  # staging folders removed

        assert [key for key, value in SECRETS.items() if any(value in text for text in console)] == []
        assert secrets_in(run, fs) == [] and secrets_in(str(tmp_path)) == []
        logs = [os.path.join(d, f) for d, _, files in os.walk(ray_tmp) for f in files if d.endswith("logs")]
        assert len(logs) > 10, "Ray's session logs were not where RAY_TMPDIR puts them"
        assert secrets_in(ray_tmp) == []
        # each command's embedded Ray served its dashboard on loopback only (Ray's own account of where it bound)
        binds = [
            re.search(r"Dashboard head http address: (\S+)", open(path, errors="replace").read())
            for path in logs
            if os.path.basename(path) == "dashboard.log"
        ]
        assert len(binds) >= 4 and all(b and b.group(1).startswith("127.0.0.1:") for b in binds), binds
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_an_object_store_is_storage_every_node_shares_and_an_unreachable_one_is_one_line(s3, monkeypatch):
    from cluster.storage import check_storage
    from core.errors import UserError
    from pipelines.prep import load_prepared
    from zeray.config import RunConfig

    for key, value in s3.items():
        monkeypatch.setenv(key, value)
    check_storage(RunConfig(storage=f"s3://{BUCKET}/runs"))  # no shared_storage needed, whatever the nodes
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nobody answers there
    with pytest.raises(
        UserError,
        match=rf"^storage: s3://{BUCKET}/runs: cannot reach it \(.+\); check the "
        r"endpoint and credentials in the environment \(AWS_ENDPOINT_URL, .*\)$",
    ):
        check_storage(RunConfig(storage=f"s3://{BUCKET}/runs"))
    with pytest.raises(UserError, match=r"^data.prepared: s3://.*: cannot reach it"):
        load_prepared(f"s3://{BUCKET}/runs/x/data")


@pytest.mark.reliability("bad input", "credentials or options inside a `storage` URI")
def test_credentials_in_a_storage_uri_are_refused_without_echoing_them(artifacts, tmp_path, capsys):
    from zeray.cli import main

    config = write_config(
        tmp_path / "c.yaml", data={"train": artifacts["data"]}, model={"name_or_path": artifacts["model"]}
    )
    for uri, says in (
        ("s3://AKIAZERAY:hunter2@bucket/runs", "AWS_SECRET_ACCESS_KEY"),
        ("s3://bucket/runs?secret_key=hunter2", "AWS_ENDPOINT_URL"),
    ):
        assert main(["prep", config, f"storage={uri}"]) == 2
        err = capsys.readouterr().err
        assert "invalid value for storage" in err and says in err and "hunter2" not in err


@pytest.mark.integration
@pytest.mark.slow
def test_a_campaign_lives_in_the_object_store_and_is_pruned_there(s3, artifacts, prepared_data, tmp_path):
    """`zeray tune` with storage in the bucket: Tune's state, the trials' runs, the results and the best model all
    there; pruned at the end to one checkpoint per trial; nothing left in the temp dir."""
    import re

    from core.fs import read_bytes

    ray_tmp = tempfile.mkdtemp(prefix="zr-")
    staging = tmp_path / "tmp"
    staging.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(s3, RAY_TMPDIR=ray_tmp, TMPDIR=str(staging))
    out_uri, out = f"s3://{BUCKET}/runs/grid/tune", f"{BUCKET}/runs/grid/tune"
    config = write_config(
        tmp_path / "grid.yaml",
        name="grid",
        storage=f"s3://{BUCKET}/runs",
        data={"prepared": prepared_data},  # (the session's: prep into the bucket is the test above's)
        model={"name_or_path": artifacts["model"]},
        train={
            "num_workers": 1,
            "max_steps": 8,
            "micro_batch_size": 8,
            "lr": 3.0e-3,
            "zero_stage": 2,
            "eval_every": 2,
            "checkpoint_every": 2,
            "log_every": 2,
            "warmup_ratio": 0.0,
        },
        tune={"search": "grid", "scheduler": "fifo", "space": {"train.lr": {"grid": [3.0e-3, 1.0e-6]}}},
    )
    fs = bucket_fs(s3)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "zeray", "tune", config],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=1200,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert f"model in {out_uri}/best_model" in done.stdout

        rows = list(csv.DictReader(io.StringIO(read_bytes(fs, f"{out}/results.csv").decode())))
        assert len(rows) == 2 and {r["status"] for r in rows} == {"completed"}, [
            (r["status"], r["reason"]) for r in rows
        ]
        best = json.loads(read_bytes(fs, f"{out}/best.json"))
        assert best["value"] == min(float(r["eval_loss"]) for r in rows)
        assert best["config"] == {"train.lr": 3.0e-3} and best["steps_trained"] == 16
        assert best["model_dir"] == f"{out_uri}/best_model" and best["checkpoint"].startswith(f"{out_uri}/run_trial_")
        stored = listing(fs, out)
        assert {"campaign.json", "tune.png", "best_model/model.safetensors"} <= set(stored)
        assert 0 < best["disk_bytes"] <= sum(stored.values())
        assert any(name.startswith("experiment_state-") for name in stored)  # Tune's own state, for --resume

        # pruned: each trial keeps the one checkpoint (of four) that results.csv names
        for r in rows:
            trial = r["checkpoint"][len(out_uri) + 1 :].split("/")[0]
            kept = {
                m.group(0)
                for name in stored
                if name.startswith(f"{trial}/")
                if (m := re.match(r"[^/]+/(?:[^/]+/)*?checkpoint_[^/]+(?=/)", name))
            }
            assert kept == {r["checkpoint"][len(out_uri) + 1 :]}, (r, kept)
        assert [p.name for p in staging.iterdir() if p.name.startswith("zeray-")] == []  # staging folders removed
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_staging_folders_of_dead_processes_are_removed_and_live_ones_kept(tmp_path, monkeypatch):
    """A process killed mid-run (a Tune trial its scheduler stopped, a SIGKILLed driver) cannot remove its staging
    folder; the next run on the node does."""
    import tempfile

    from cluster.storage import remove_orphaned_staging

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for name in (f"zeray-run-{dead.pid}-abc123", f"zeray-run-{os.getpid()}-def456", "zeray-runner", "other"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("{}\n")
    remove_orphaned_staging()
    kept = sorted([f"zeray-run-{os.getpid()}-def456", "other", "zeray-runner"])
    assert sorted(p.name for p in tmp_path.iterdir()) == kept
