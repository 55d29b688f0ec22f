"""Real `zeray tune` campaigns on the tiny model: Ray Tune trials that each fit a TorchTrainer with DeepSpeed.

In-process on the session's Ray (4 CPUs: two 1-worker trials at once beside Ray Data), except the campaign that is
killed and resumed, which runs as the real command in its own process group with its own embedded Ray.
"""

import csv
import glob
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, write_config

from zeray.cli import main

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def campaign(root, name, artifacts, tune, data=None, prepared=None, **train):
    settings = {
        "num_workers": 1,
        "max_steps": 8,
        "micro_batch_size": 8,
        "lr": 3.0e-3,
        "zero_stage": 2,
        "eval_every": 2,
        "checkpoint_every": 4,
        "log_every": 2,
        "warmup_ratio": 0.0,
        **train,
    }
    return write_config(
        root / f"{name}.yaml",
        name=name,
        storage=str(root / "runs"),
        data={"prepared": prepared}
        if prepared
        else {"train": data or artifacts["data"], "format": "messages", "max_length": 96},
        model={"name_or_path": artifacts["model"]},
        train=settings,
        tune=tune,
    )


def results(tune_dir) -> list[dict]:
    with open(os.path.join(tune_dir, "results.csv"), newline="") as f:
        return list(csv.DictReader(f))


def metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def trial_dir(tune_dir, trial_id) -> str:
    (found,) = glob.glob(os.path.join(tune_dir, f"run_trial_{trial_id}_*"))
    return found


def test_optuna_campaign_runs_its_trials_and_exports_the_best(ray_cluster, artifacts, prepared_data, tmp_path):
    config = campaign(
        tmp_path,
        "optuna",
        artifacts,
        prepared=prepared_data,
        max_steps=4,
        tune={
            "search": "optuna",
            "scheduler": "fifo",
            "num_samples": 2,
            "space": {"train.lr": {"loguniform": [1.0e-4, 3.0e-3]}},
        },
    )
    assert main(["tune", config]) == 0
    out = tmp_path / "runs" / "optuna" / "tune"
    rows = results(out)
    assert len(rows) == 2 and {r["status"] for r in rows} == {"completed"}
    lrs = [float(r["train.lr"]) for r in rows]
    assert len(set(lrs)) == 2 and all(1.0e-4 <= lr <= 3.0e-3 for lr in lrs)
    assert glob.glob(str(out / "searcher-state-*.pkl"))  # Optuna's study, saved for --resume
    best = json.loads((out / "best.json").read_text())
    assert best["value"] == min(float(r["eval_loss"]) for r in rows)
    assert best["trials"] == {"completed": 2, "stopped": 0, "failed": 0} and best["steps_trained"] == 8
    assert os.path.isfile(os.path.join(best["model_dir"], "model.safetensors"))
    # the base model was evaluated once for the campaign (its trials share the data), by one trial
    bases = [
        row["base_eval_loss"]
        for r in rows
        for row in metrics(os.path.join(trial_dir(out, r["trial"]), "train"))
        if "base_eval_loss" in row
    ]
    assert len(bases) == 1 and best["base_eval_loss"] == bases[0] > best["value"]
    # disk: every trial kept exactly its best checkpoint
    for r in rows:
        kept = glob.glob(os.path.join(trial_dir(out, r["trial"]), "train", "checkpoint_*", ""))
        kept = [path.rstrip(os.sep) for path in kept]
        assert kept == [r["checkpoint"]]


@pytest.mark.reliability("bad input", "a trial whose settings cannot train (micro-batch larger than the data)")
def test_trials_keep_the_checkpoint_best_by_the_campaigns_own_metric_and_a_failing_trial_is_recorded(
    ray_cluster, artifacts, tmp_path
):
    """tune.metric and tune.mode rank a trial's checkpoints as they rank trials: a campaign after the largest
    validation loss (the earliest checkpoint, as the loss falls) keeps and chooses that one, where ranking by the
    lowest loss, as `zeray train` does, would have deleted it. A trial whose settings cannot train (a micro-batch
    larger than the data) is recorded failed with its reason, and the campaign goes on. (Its data: a two-source
    mixture, prepared once for the campaign.)"""
    from test_resume import mixture

    config = campaign(
        tmp_path,
        "largest",
        artifacts,
        data=mixture(tmp_path, artifacts),
        max_steps=6,
        checkpoint_every=2,
        tune={
            "search": "grid",
            "scheduler": "fifo",
            "metric": "eval_loss",
            "mode": "max",
            "space": {"train.micro_batch_size": {"grid": [8, 4096]}},
        },
    )
    assert main(["tune", config]) == 0
    out = tmp_path / "runs" / "largest" / "tune"
    rows = {r["train.micro_batch_size"]: r for r in results(out)}
    assert rows["4096"]["status"] == "failed"
    assert "too few for train.num_workers=1 x train.micro_batch_size=4096" in rows["4096"]["reason"]
    row = rows["8"]
    assert row["status"] == "completed" and row["reason"] == ""
    run = os.path.join(trial_dir(out, row["trial"]), "train")
    scored = {r["step"]: r["eval_loss"] for r in metrics(run) if "checkpoint" in r}
    assert sorted(scored) == [2, 4, 6] and scored[2] > scored[4] > scored[6]  # the loss falls
    best = json.loads((out / "best.json").read_text())
    assert best["config"] == {"train.micro_batch_size": 8} and best["trials"]["failed"] == 1
    assert best["metric"] == "eval_loss" and best["step"] == 2 and best["value"] == pytest.approx(scored[2])
    kept = sorted(path.rstrip(os.sep) for path in glob.glob(os.path.join(run, "checkpoint_*", "")))
    assert kept == [best["checkpoint"]] == [row["checkpoint"]]  # step 2's, the only one the trial keeps
    summary = json.loads(open(os.path.join(run, "summary.json")).read())
    prepared = json.loads((out / "data" / "report.json").read_text())
    assert [s["weight"] for s in summary["records"]["sources"]] == [1, 3] == [s["weight"] for s in prepared["sources"]]


def test_pbt_exploit_continues_from_the_better_trials_weights(ray_cluster, artifacts, prepared_data, tmp_path):
    from conftest import SLOW, paced

    config = campaign(
        tmp_path,
        "pbt",
        artifacts,
        prepared=prepared_data,
        max_steps=16,
        eval_every=4,
        log_every=1,
        tune={"search": "grid", "scheduler": "pbt", "space": {"train.lr": {"grid": [3.0e-3, 1.0e-6]}}},
    )
    # the trials overlap: a report (a step) every 2 s, and checkpoints (PBT's chances) every 4 of 16 steps, so that
    # the weak trial still has some to reach after the strong one's first report, which comes up to 7 s after its
    # own when the other pytest worker keeps the cores busy as both trials start. Each exploit while both trials
    # run starts a new run: the strong trial ends about when the weak one's first continuation starts.
    with paced(SLOW):
        assert main(["tune", config]) == 0
    out = str(tmp_path / "runs" / "pbt" / "tune")
    trials = glob.glob(os.path.join(out, "run_trial_*"))
    exploited = [d for d in trials if os.path.exists(os.path.join(d, "zeray_run.json"))]
    assert exploited  # the 1e-6 trial falls behind at its first checkpoint and takes over the 3e-3 trial's
    # the first exploit (later ones may go either way, or come at the last step and leave nothing to train): its
    # run starts at the strong trial's step, and its weights score exactly what the strong trial's checkpoint
    # scored there
    weak = min(exploited, key=lambda d: metrics(os.path.join(d, "train-2"))[0]["step"])
    (strong,) = [d for d in trials if d != weak]
    first = os.path.join(weak, "train-2")
    start = metrics(first)[0]
    assert start["started_from"] == os.path.join(weak, "start-2") and start["step"] > 0
    scored = [
        r["eval_loss"]
        for d in glob.glob(os.path.join(strong, "train*"))
        for r in metrics(d)
        if "checkpoint" in r and r["step"] == start["step"]
    ]
    assert any(start["eval_loss"] == pytest.approx(loss, rel=1e-6) for loss in scored), (start, scored)
    # and trains on with the rate PBT gave it (its config), on the schedule's position it took over (cosine over
    # 16 steps, no warmup), not with the rate the checkpoint carried
    continued = [r for r in metrics(first) if "loss" in r]
    with open(os.path.join(first, "config.json")) as f:
        lr = json.load(f)["train"]["lr"]
    assert continued and continued[0]["step"] > start["step"]
    step = continued[0]["step"]
    assert continued[0]["lr"] == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi * (step - 1) / 16)), rel=1e-6)


@pytest.mark.reliability("fault", "a Tune campaign SIGKILLed (driver, Ray, trials), then `--resume`")
def test_asha_campaign_killed_then_resumed_reruns_no_finished_trial(artifacts, prepared_data, tmp_path, capsys):
    config = campaign(
        tmp_path,
        "asha",
        artifacts,
        prepared=prepared_data,
        tune={
            "search": "grid",
            "scheduler": "asha",
            "grace_period": 2,
            "reduction_factor": 2,
            "max_concurrent": 1,
            "space": {"train.lr": {"grid": [3.0e-3, 1.0e-5, 3.0e-6]}},
        },
    )
    out = str(tmp_path / "runs" / "asha" / "tune")
    assert main(["tune", config, "--resume"]) == 2  # nothing to resume yet
    assert "--resume: " + out + " holds no campaign to resume" in capsys.readouterr().err
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    command = [sys.executable, "-m", "zeray", "tune", config]
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    # kill the whole campaign (driver, its Ray, every trial) once Tune has recorded the first trial as finished
    deadline = time.monotonic() + 600
    finished = None
    while time.monotonic() < deadline and first.poll() is None and finished is None:
        for path in glob.glob(os.path.join(out, "run_trial_*", "train", "summary.json")):
            state = "".join(open(p).read() for p in glob.glob(os.path.join(out, "experiment_state-*.json")))
            if "TERMINATED" in state:
                finished = os.path.dirname(os.path.dirname(path))
        time.sleep(0.5)
    assert finished, open(tmp_path / "first.log").read()[-3000:]
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    before = open(os.path.join(finished, "train", "metrics.jsonl")).read()

    again = subprocess.run(command + ["--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resuming campaign asha" in again.stdout
    assert open(os.path.join(finished, "train", "metrics.jsonl")).read() == before  # not run again

    rows = {float(r["train.lr"]): r for r in results(out)}
    assert len(rows) == 3
    assert rows[3.0e-3]["status"] == "completed" and int(rows[3.0e-3]["steps_trained"]) == 8
    # ASHA stopped a weak trial early (the rung's records may not survive the kill: then the first weak trial to
    # run after the resume goes on, and the next one falls behind it)
    stopped = [r for r in rows.values() if r["status"] == "stopped"]
    assert stopped and all(int(r["steps_trained"]) < 8 for r in stopped)
    best = json.loads(open(os.path.join(out, "best.json")).read())
    assert best["config"] == {"train.lr": 3.0e-3} and best["step"] == 8
    assert best["steps_trained"] == sum(int(r["steps_trained"]) for r in rows.values())
    assert best["disk_bytes"] > 0 and os.path.isfile(os.path.join(out, "tune.png"))

    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(best["model_dir"], use_safetensors=True)
    base = AutoModelForCausalLM.from_pretrained(artifacts["model"], use_safetensors=True)
    assert model.num_parameters() == base.num_parameters()  # the whole model, trained: not the base's weights
    assert not torch.equal(model.model.embed_tokens.weight, base.model.embed_tokens.weight)
    # a second `zeray tune` without --resume refuses to overwrite the campaign, before it starts a Ray
    refused = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "already holds campaign asha; add --resume" in refused.stderr
    assert "zeray tune asha: " not in refused.stdout, refused.stdout  # (printed once its Ray is up)
