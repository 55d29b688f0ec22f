"""Exact resume: a 2-worker ZeRO-3 run with CPU offload (DeepSpeed's CPU Adam) whose worker process is SIGKILLed
mid-run is restarted by Ray Train, resumes from its last checkpoint, and ends with the same weights and the same
losses as an uninterrupted run."""

import json
import os
import random
import re
import signal
import threading
import time

import psutil
import pytest
from conftest import write_config

from zeray.cli import main

pytestmark = pytest.mark.integration

STEPS = 40  # a cap: one epoch of the test mixture is 26 steps (429 packed rows in global micro-batches of 16)


def mixture(root, artifacts) -> list[dict]:
    """The test data as a mixture of two sources, the second weighted three times the first: exact resume holds
    for the drawn (repeated and sampled) records too."""
    lines = open(artifacts["data"], encoding="utf-8").read().splitlines(keepends=True)
    sources = []
    for name, part, weight in (("first.jsonl", lines[:1800], 1), ("second.jsonl", lines[1800:], 3)):
        if not (root / name).exists():
            (root / name).write_text("".join(part), encoding="utf-8")
        sources.append({"path": str(root / name), "weight": weight})
    return sources


@pytest.fixture(scope="module")
def prepared(ray_cluster, artifacts, tmp_path_factory) -> str:
    """The mixture as `zeray prep` writes it, which the runs here train on (`data.prepared`): they test training,
    and skip the pipeline's tokenizer actors and sort (about 8 CPU-seconds a run)."""
    root = tmp_path_factory.mktemp("mixture")
    data = {"train": mixture(root, artifacts), "format": "messages", "max_length": 96}
    config = write_config(
        root / "prep.yaml", name="prep", storage=str(root), data=data, model={"name_or_path": artifacts["model"]}
    )
    assert main(["prep", config]) == 0
    return str(root / "prep" / "data")


def run_config(root, name, artifacts, prepared, max_failures=2, **train):
    return write_config(
        root / f"{name}.yaml",
        name=name,
        storage=str(root / "runs"),
        data={"prepared": prepared},
        model={"name_or_path": artifacts["model"]},
        train={
            "num_workers": 2,
            "max_steps": STEPS,
            "micro_batch_size": 8,
            "lr": 3.0e-3,
            "zero_stage": 3,
            "offload": "cpu",
            "eval_every": 1000,
            "checkpoint_every": 8,
            "log_every": 2,
            "max_failures": max_failures,
            **train,
        },
    )


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def logged_steps(run_dir) -> list[int]:
    try:
        return [r["step"] for r in metrics(run_dir) if "loss" in r]
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def own_train_workers() -> list[psutil.Process]:
    """The Ray Train workers of this test process's own Ray (its descendants), none of another Ray's on the machine."""
    workers = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if any("RayTrainWorker" in part for part in proc.cmdline()):
                workers.append(proc)
        except psutil.Error:  # gone meanwhile
            pass
    return workers


def kill_workers_at(run_dir, targets: list[int], done: list, rng: random.Random):
    """SIGKILL one Ray Train worker process each time the run logs a step at or past the next target (counting
    only steps logged since the last kill, so after a restart from a checkpoint); `done` gets (step, pid)."""
    deadline = time.monotonic() + 900
    seen = 0  # steps logged before the last kill
    while time.monotonic() < deadline and len(done) < len(targets):
        steps = logged_steps(run_dir)[seen:]
        if steps and steps[-1] >= targets[len(done)]:
            killed = {pid for _, pid in done}
            workers = [p for p in own_train_workers() if p.pid not in killed]
            if workers:
                victim = rng.choice(workers)
                done.append((steps[-1], victim.pid))
                seen += len(steps)
                os.kill(victim.pid, signal.SIGKILL)
        time.sleep(0.05)


@pytest.fixture(scope="module")
def straight(ray_cluster, artifacts, prepared, tmp_path_factory):
    """The uninterrupted run the interrupted ones must end up equal to."""
    root = tmp_path_factory.mktemp("straight")
    assert main(["train", run_config(root, "straight", artifacts, prepared)]) == 0
    return root / "runs" / "straight"


def assert_same_run(interrupted, straight) -> None:
    """Every step the interrupted run logged (before and after its restart) has the uninterrupted run's loss, and
    its model the same weights."""
    from safetensors.torch import load_file

    losses = {r["step"]: r["loss"] for r in metrics(str(straight)) if "loss" in r}
    for row in metrics(str(interrupted)):
        if "loss" in row:
            assert row["loss"] == pytest.approx(losses[row["step"]], abs=1e-5), row["step"]
    a = load_file(str(straight / "model" / "model.safetensors"))
    b = load_file(str(interrupted / "model" / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for key in a:
        assert (a[key] - b[key]).abs().max().item() <= 1e-6, key


def test_a_zero3_run_exports_the_weights_its_shards_hold(straight, capsys):
    """The uninterrupted ZeRO-3 run: its model holds exactly the weights consolidated from the parameter shards of
    its checkpoint, and loads with them (tied lm_head included); its two workers' shared test evaluation is what one
    worker scores on that model."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from trainers.checkpoints import consolidate

    summary = json.loads((straight / "summary.json").read_text())
    assert summary["steps"] == 26 and summary["zero_stage"] == 3 and summary["world_size"] == 2
    assert [r["step"] for r in metrics(str(straight)) if "checkpoint" in r] == [8, 16, 24, 26]
    assert [s["weight"] for s in summary["records"]["sources"]] == [1, 3]
    model, _ = consolidate(summary["checkpoint"])
    exported = load_file(str(straight / "model" / "model.safetensors"))
    state = model.state_dict()
    assert exported and set(exported) <= set(state)
    for name, tensor in exported.items():
        assert (tensor - state[name]).abs().max().item() == 0.0, name
    loaded = AutoModelForCausalLM.from_pretrained(str(straight / "model"), use_safetensors=True)
    assert all(bool((t == state[k]).all()) for k, t in loaded.state_dict().items())
    config = straight.parent.parent / "straight.yaml"
    capsys.readouterr()
    assert main(["eval", str(config), "train.num_workers=1", "--model", str(straight / "model")]) == 0
    out = capsys.readouterr().out
    alone = json.loads(out[out.index("{") :])
    assert alone["test_loss"] == pytest.approx(summary["test_loss"], rel=1e-6)
    assert alone["test_token_accuracy"] == pytest.approx(summary["test_token_accuracy"], rel=1e-6)


@pytest.mark.reliability(
    "fault",
    "a training worker (2-worker ZeRO-3 run of 26 steps on a two-source mixture, gradient checkpointing) SIGKILLed "
    "at three random steps",
    runs=3,
)
def test_worker_killed_at_three_random_steps_resumes_to_identical_weights(
    straight, artifacts, prepared, tmp_path, paced_reports
):
    seed = int(os.environ.get("ZERAY_TEST_SEED", time.time_ns() % 10**6))
    rng = random.Random(seed)
    # one step in each third of the 26-step run (steps are logged every 2), on and between checkpoints
    targets = [rng.randrange(lo, hi, 2) for lo, hi in ((2, 10), (10, 18), (18, 26))]
    why = f"ZERAY_TEST_SEED={seed}: kills at steps {targets}"
    interrupted = tmp_path / "runs" / "killed"
    done: list = []
    killer = threading.Thread(target=kill_workers_at, args=(str(interrupted), targets, done, rng), daemon=True)
    killer.start()
    # with gradient checkpointing, which the uninterrupted run does without: the same losses and weights
    config = run_config(tmp_path, "killed", artifacts, prepared, max_failures=3, gradient_checkpointing=True)
    assert main(["train", config]) == 0, why
    killer.join(timeout=5)
    assert len(done) == 3, f"{why}; killed only {done}: the run finished first"
    assert all(step >= target for (step, _), target in zip(done, targets)), (why, done)

    steps = logged_steps(str(interrupted))
    replays = sum(1 for a, b in zip(steps, steps[1:]) if b <= a)  # a restart went back to its last checkpoint
    between_checkpoints = sum(1 for step, _ in done if step % 8)  # kills that left steps to do again
    assert replays >= between_checkpoints, (why, done, steps)
    assert_same_run(interrupted, straight)
    assert json.loads((interrupted / "summary.json").read_text())["gradient_checkpointing"] is True


@pytest.mark.slow
@pytest.mark.reliability(
    "fault", "the driver SIGKILLed with its embedded Ray and workers mid-run, then the same command run again"
)
def test_killed_driver_then_the_same_command_resumes_to_identical_weights(straight, artifacts, prepared, tmp_path):
    """The driver itself dies (SIGKILL to the command, its embedded Ray and its workers); the same command run
    again finds the run's checkpoints in its storage and finishes it as if nothing had happened."""
    import subprocess
    import sys

    from conftest import PACED, REPO

    config = run_config(tmp_path, "driver", artifacts, prepared)
    run = tmp_path / "runs" / "driver"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    command = [sys.executable, "-m", "zeray", "train", config]
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(
            command, cwd=REPO, env=dict(env, **PACED), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = time.monotonic() + 600
    checkpointed = 0
    while time.monotonic() < deadline and first.poll() is None and checkpointed < 16:
        if (run / "metrics.jsonl").exists():
            checkpointed = max([r["step"] for r in metrics(str(run)) if "checkpoint" in r] or [0])
        time.sleep(0.2)
    assert first.poll() is None and checkpointed >= 16, (tmp_path / "first.log").read_text()[-3000:]
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert not (run / "summary.json").exists()

    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resuming run driver from its checkpoints" in again.stdout and "ZeRO 3 + CPU offload" in again.stdout
    resumed = re.search(r"resumed from checkpoint at step (\d+)", again.stdout)
    assert resumed and int(resumed.group(1)) >= checkpointed, again.stdout[-3000:]
    assert_same_run(run, straight)
    assert [r["step"] for r in metrics(str(run)) if "base_eval_loss" in r] == [0]  # not evaluated again on resuming
    # the console: zeray's lines only (each step's, the evaluations', the summary), none of Ray's or DeepSpeed's,
    # which went to the run's log file with the workers' own output
    assert again.stderr == "" and again.stdout.startswith(f"logs: {run / 'logs' / 'train.log'} ")
    assert re.search(r"^step (\d+)/\1 epoch .* eta 0m00s$", again.stdout, re.M) and "\ndone in " in again.stdout
    assert not re.search(r"pid=|INFO|WARNING|Setting accelerator|\[A", again.stdout), again.stdout
    logged = (run / "logs" / "train.log").read_text()
    assert "(RayTrainWorker pid=" in logged and "Setting accelerator to CPU" in logged
    # but no progress bars of the workers' passes over the splits (Ray's tqdm state, as JSON lines)
    assert "__ray_tqdm_magic_token__" not in logged and not re.search(r"Dataset (train|val|test)_\w+", logged)
    # Ray Train's placement-group cleaner found its own cluster, though the session's Ray runs on this machine too
    assert "multiple active Ray instances" not in logged


@pytest.mark.slow
@pytest.mark.reliability(
    "fault", "the newest checkpoints truncated on disk (a rank's optimizer shard cut in half), then the run re-run"
)
def test_a_truncated_checkpoint_is_detected_and_the_previous_one_used(
    ray_cluster, artifacts, prepared_data, tmp_path, capfd
):
    """A ZeRO-1 run re-run after its newest checkpoints were cut short on disk (a file truncated, as a dead node
    mid-copy or a full disk leaves it) resumes from the intact one before them, says so, and ends with the same
    weights, which its export holds exactly as its checkpoint's shards consolidate."""
    import glob
    import shutil

    from safetensors.torch import load_file

    from trainers.checkpoints import consolidate

    config = write_config(
        tmp_path / "cut.yaml",
        name="cut",
        storage=str(tmp_path / "runs"),
        data={"prepared": prepared_data},
        model={"name_or_path": artifacts["model"]},
        train={
            "num_workers": 2,
            "max_steps": 8,
            "micro_batch_size": 8,
            "lr": 3.0e-3,
            "zero_stage": 1,
            "eval_every": 4,
            "checkpoint_every": 4,
            "log_every": 2,
            "keep_checkpoints": 3,
        },
    )
    assert main(["train", config]) == 0
    run = tmp_path / "runs" / "cut"
    first = load_file(str(run / "model" / "model.safetensors"))
    shutil.rmtree(run / "model")

    def step(checkpoint):
        return json.loads((checkpoint / "zeray_state.json").read_text())["step"]

    checkpoints = [p for p in run.glob("checkpoint_*") if p.is_dir()]
    assert sorted({step(c) for c in checkpoints}) == [4, 8]
    for checkpoint in checkpoints:
        if step(checkpoint) == 8:  # every step-8 checkpoint: a rank's optimizer shard loses its second half
            (shard,) = glob.glob(str(checkpoint / "ds" / "*rank_1*optim_states.pt"))
            with open(shard, "r+b") as f:
                f.truncate(os.path.getsize(shard) // 2)
    capfd.readouterr()
    assert main(["train", config]) == 0
    out = ""
    for _ in range(20):  # the workers' lines reach the driver through Ray's log forwarding
        out += capfd.readouterr().out
        if "resumed from checkpoint" in out:
            break
        time.sleep(0.5)
    assert "is damaged (ds/" in out and "of its" in out and "resuming from" in out, out
    assert "resumed from checkpoint at step 4" in out, out
    again = load_file(str(run / "model" / "model.safetensors"))
    for key in first:  # steps 5-8 trained again from step 4: the same weights
        assert (first[key] - again[key]).abs().max().item() <= 1e-6, key
    rows = metrics(str(run))
    assert [r["step"] for r in rows if "base_eval_loss" in r] == [0]  # the base evaluated once, not on resuming
    assert [r["step"] for r in rows if "loss" in r] == [2, 4, 6, 8, 6, 8]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["zero_stage"] == 1
    model, _ = consolidate(summary["checkpoint"])
    state = model.state_dict()
    for name, tensor in again.items():
        assert (tensor - state[name]).abs().max().item() == 0.0, name
