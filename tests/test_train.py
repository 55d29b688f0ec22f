"""The real `zeray train` (in-process, on the session's Ray): Ray Data → TorchTrainer(2 workers) → DeepSpeed ZeRO-2."""

import glob
import json
import math
import os
import time

import pytest
from conftest import write_config

from zeray.cli import main

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def trained(ray_cluster, artifacts, tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    # the user's own DeepSpeed settings ride along (merged under zeray's)
    (root / "ds.json").write_text(
        json.dumps({"zero_optimization": {"overlap_comm": False, "contiguous_gradients": True}})
    )
    config = write_config(
        root / "tiny.yaml",
        name="tiny",
        storage=str(root / "runs"),
        data={"train": artifacts["data"], "format": "messages", "max_length": 96},
        model={"name_or_path": artifacts["model"]},
        train={
            "num_workers": 2,
            "max_steps": 16,
            "micro_batch_size": 8,
            "lr": 3.0e-3,
            "zero_stage": 2,
            "eval_every": 8,
            "checkpoint_every": 8,
            "log_every": 4,
            "warmup_ratio": 0.0,
            # (the memory savers on: test_one_and_two_workers_give_the_same_loss_curve compares this run's curve
            # with a plain single worker's)
            "gradient_checkpointing": True,
            "deepspeed": str(root / "ds.json"),
            # and the experiment trackers: TensorBoard files and an MLflow run (a local database here)
            "tensorboard": True,
            "mlflow_uri": f"sqlite:///{root}/mlflow.db",
            "mlflow_experiment": "tests",
            # and Weights & Biases in its offline mode (its files under <run>/wandb/)
            "wandb_project": "zeray-tests",
        },
    )
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_MODE", "offline")
        code = main(["train", config])
    return {
        "code": code,
        "run_dir": str(root / "runs" / "tiny"),
        "config": config,
        "mlflow": f"sqlite:///{root}/mlflow.db",
    }


def tensorboard_scalars(folder: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files of `folder` (TFRecord framing: length, its CRC, the event
    protobuf, its CRC), by tag."""
    import struct

    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(glob.glob(os.path.join(folder, "events.out.tfevents.*"))):
        data, at = open(path, "rb").read(), 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at : at + 8])
            event = event_pb2.Event.FromString(data[at + 12 : at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def wandb_records(run_dir: str, wait_s: float = 30) -> list:
    """Every record of the W&B offline run files under `run_dir` (LevelDB log framing after W&B's 7-byte header:
    32 KiB blocks of chunks, each with a 7-byte header of CRC, length and type), oldest file first. W&B's core
    writes a file behind `finish()`: each file is read again until it holds its run's exit record."""
    import struct

    from wandb.proto import wandb_internal_pb2

    def read(path: str) -> list:
        records, data, at, parts = [], open(path, "rb").read(), 7, b""
        assert data[:4] == b":W&B"[: len(data)], path  # (an empty file: W&B's core has not written it yet)
        while at + 7 <= len(data):
            if 32768 - at % 32768 < 7:  # a block's tail too short for a chunk header is padding
                at += 32768 - at % 32768
                continue
            _, length, kind = struct.unpack("<IHB", data[at : at + 7])
            if at + 7 + length > len(data):  # a chunk still being written
                break
            parts += data[at + 7 : at + 7 + length]
            at += 7 + length
            if kind in (1, 4):  # a full record, or the last chunk of one
                records.append(wandb_internal_pb2.Record.FromString(parts))
                parts = b""
        return records

    runs = []  # (when its file was last written, its records)
    for folder in glob.glob(os.path.join(run_dir, "wandb", "offline-run-*")):
        deadline = time.monotonic() + wait_s
        while True:
            files = glob.glob(os.path.join(folder, "run-*.wandb"))
            found = [r for path in files for r in read(path)]
            if any(r.WhichOneof("record_type") == "exit" for r in found):
                break
            assert time.monotonic() < deadline, f"{folder}: no run file with an exit record after {wait_s} s"
            time.sleep(0.2)
        runs.append((max(map(os.path.getmtime, files)), found))
    return [r for _, found in sorted(runs, key=lambda run: run[0]) for r in found]


def wandb_key(item) -> str:
    return item.key or "/".join(item.nested_key)  # (W&B's core writes keys as one-part paths)


def test_every_logged_metric_reaches_tensorboard_mlflow_and_wandb(trained):
    from mlflow import MlflowClient

    rows = [json.loads(line) for line in open(os.path.join(trained["run_dir"], "metrics.jsonl"))]
    losses = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    assert [s for s, _ in losses] == [4, 8, 12, 16] and {s for s, _ in evals} == {8, 16}  # (the end reports twice)
    (base,) = [r["base_eval_loss"] for r in rows if "base_eval_loss" in r]

    scalars = tensorboard_scalars(os.path.join(trained["run_dir"], "tensorboard"))
    assert [(s, pytest.approx(v)) for s, v in scalars["train/loss"]] == losses
    assert [(s, pytest.approx(v)) for s, v in scalars["eval/eval_loss"]] == evals
    assert scalars["eval/base_eval_loss"] == [(0, pytest.approx(base))]
    assert {"train/lr", "train/tokens_per_s", "eval/eval_perplexity"} <= set(scalars)

    client = MlflowClient(tracking_uri=trained["mlflow"])
    experiment = client.get_experiment_by_name("tests").experiment_id
    (run,) = [r for r in client.search_runs([experiment]) if r.info.run_name == "tiny"]
    run_id = json.load(open(os.path.join(trained["run_dir"], "mlflow_run.json")))["run_id"]
    assert run.info.run_id == run_id and run.info.run_name == "tiny" and run.info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [
        (s, pytest.approx(v)) for s, v in losses
    ]
    assert run.data.params["train.zero_stage"] == "2" and run.data.params["model.name_or_path"].endswith("tiny-test")
    summary = json.load(open(os.path.join(trained["run_dir"], "summary.json")))
    assert run.data.metrics["final/test_loss"] == pytest.approx(summary["test_loss"])

    # W&B: one run (opened by the driver, fed by the controller, closed with the summary), every step, the config
    run_id = json.load(open(os.path.join(trained["run_dir"], "wandb_run.json")))["run_id"]
    records = wandb_records(trained["run_dir"])
    runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert len(runs) == 3 and {(r.run_id, r.project) for r in runs} == {(run_id, "zeray-tests")}
    config = {wandb_key(item): json.loads(item.value_json) for r in runs for item in r.config.update}
    assert config["train.zero_stage"] == 2 and config["model.name_or_path"].endswith("tiny-test")
    history: dict[int, dict] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {wandb_key(item): json.loads(item.value_json) for item in r.history.item}
            history.setdefault(row["_step"], {}).update(row)
    assert [(s, pytest.approx(history[s]["loss"])) for s, _ in losses] == losses
    assert [(s, pytest.approx(history[s]["eval_loss"])) for s, _ in evals] == evals
    assert sorted(history) == [0, 4, 8, 12, 16] and "lr" in history[4] and "eval_perplexity" in history[16]
    assert history[0]["base_eval_loss"] == pytest.approx(base) and "loss" not in history[0]
    final = {
        wandb_key(item): json.loads(item.value_json)
        for r in records
        if r.WhichOneof("record_type") == "summary"
        for item in r.summary.update
        if wandb_key(item).startswith("final/")
    }
    assert final["final/test_loss"] == pytest.approx(summary["test_loss"]) and final["final/steps"] == 16
    exits = [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"]
    assert exits == [0, 0, 0]


def test_train_exits_0_and_loss_goes_down(trained):
    assert trained["code"] == 0
    with open(os.path.join(trained["run_dir"], "summary.json")) as f:
        summary = json.load(f)
    assert summary["world_size"] == 2 and summary["zero_stage"] == 2 and summary["steps"] == 16
    assert summary["chunked_loss"] is True and summary["gradient_checkpointing"] is True
    assert summary["eval_loss"] < summary["first_loss"]
    assert summary["final_loss"] < summary["first_loss"] - 0.5
    assert summary["test_loss"] > 0 and summary["eval_perplexity"] > 1
    assert summary["records"]["records_in"] > 2000
    # on CPU the peak is unknown: MFU is reported as unavailable, not guessed; memory is the workers' peak RSS
    assert summary["mfu"] is None and 0.2 < summary["peak_memory_gb"] < 8


@pytest.mark.reliability("bad input", "a DeepSpeed JSON contradicting the config")
def test_contradicting_deepspeed_file_is_refused_before_workers_start(trained, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"gradient_accumulation_steps": 4}))
    capsys.readouterr()
    assert main(["train", trained["config"], f"train.deepspeed={bad}", "name=other"]) == 2
    err = capsys.readouterr().err
    assert "sets gradient_accumulation_steps=4 but zeray sets 1 from train.grad_accum" in err


@pytest.mark.reliability("bad input", "data with no usable record (every line unparsable or without a reply)")
def test_data_with_no_usable_record_is_refused_with_the_reasons(ray_cluster, artifacts, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{not json\n{"messages": [{"role": "user", "content": "no reply"}]}\n')
    config = write_config(
        tmp_path / "bad.yaml",
        name="bad",
        storage=str(tmp_path / "runs"),
        data={"train": str(bad), "format": "messages"},
        model={"name_or_path": artifacts["model"]},
    )
    capsys.readouterr()
    assert main(["train", config]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: data.train: no record to train on (2 records in, rejected: no_assistant_turn 1, unparsable 1); "
        "`zeray prep` writes each rejected record with its reason to data/rejects.jsonl"
    )


@pytest.mark.reliability("bad input", "resuming a run with other settings")
def test_resuming_with_other_settings_is_refused(trained, capsys):
    capsys.readouterr()
    assert main(["train", trained["config"], "train.micro_batch_size=4", "train.lr=0.1"]) == 2
    err = capsys.readouterr().err
    assert "holds run tiny with other settings (train.micro_batch_size: 8 -> 4; train.lr: 0.003 -> 0.1)" in err


@pytest.mark.slow
@pytest.mark.reliability("bad input", "a learning rate that makes the loss diverge")
def test_a_diverging_loss_stops_the_run_with_its_reason(trained, artifacts, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    model = tmp_path / "poisoned"
    shutil.copytree(artifacts["model"], model)
    weights = load_file(model / "model.safetensors")
    name = next(k for k in sorted(weights) if "layers.0." in k and weights[k].dim() == 2)
    weights[name][0, 0] = float("nan")  # one bad weight: the first step's loss is NaN
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    capsys.readouterr()
    # (unpacked: the packing check before training would already refuse a model that computes NaN)
    assert main(["train", trained["config"], f"model.name_or_path={model}", "data.packing=false", "name=diverged"]) == 2
    err = capsys.readouterr().err
    assert "error: training diverged at step 1: the loss became nan (lower train.lr" in err, err[-2000:]
    assert not os.path.exists(os.path.join(os.path.dirname(trained["run_dir"]), "diverged", "model"))


def test_metrics_jsonl_has_steps_evals_and_checkpoints(trained):
    with open(os.path.join(trained["run_dir"], "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows if "loss" in r] == [4, 8, 12, 16]
    assert [r["step"] for r in rows if "eval_loss" in r] == [8, 16, 16]
    # the base model, evaluated before the first step: the same split and metric, a worse loss than trained
    (base,) = [r for r in rows if "base_eval_loss" in r]
    assert rows[0] is base and base["step"] == 0 and base["base_eval_tokens"] == rows[-1]["eval_tokens"]
    summary = json.load(open(os.path.join(trained["run_dir"], "summary.json")))
    assert summary["base_eval_loss"] == base["base_eval_loss"] > summary["eval_loss"] + 0.5
    assert summary["base_eval_perplexity"] == pytest.approx(math.exp(base["base_eval_loss"]))
    assert all(r["tokens_per_s"] > 0 and r["lr"] > 0 for r in rows if "loss" in r)
    assert len([r for r in rows if "checkpoint" in r]) == 2
    assert os.path.getsize(os.path.join(trained["run_dir"], "report.png")) > 10_000


def test_checkpoint_holds_both_ranks_deepspeed_shards(trained):
    with open(os.path.join(trained["run_dir"], "summary.json")) as f:
        ckpt = json.load(f)["checkpoint"]
    shards = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ckpt, "ds", "*optim_states.pt")))
    assert shards == ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert os.path.exists(os.path.join(ckpt, "ds", "mp_rank_00_model_states.pt"))


def test_exported_model_loads_and_generates(trained, artifacts, capsys):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainers.generate import generate

    model_dir = os.path.join(trained["run_dir"], "model")
    assert os.path.exists(os.path.join(model_dir, "model.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=8,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    assert out.shape[1] > ids.shape[1]
    # `zeray generate` (greedy by default) replies with exactly the tokens greedy decoding gives
    reply = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
    assert generate(model_dir, "Hello", max_new_tokens=8) == reply
    # several prompts from the command line: each answered as if asked alone, under its prompt
    assert main(["generate", model_dir, "--prompt", "Hi", "--prompt", "Hello", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out == f"> Hi\n{generate(model_dir, 'Hi', max_new_tokens=8)}\n> Hello\n{reply}\n"
    # the export carries the trained weights, not the initial ones
    initial = AutoModelForCausalLM.from_pretrained(artifacts["model"])
    assert not torch.allclose(model.model.embed_tokens.weight, initial.model.embed_tokens.weight)


def test_export_any_checkpoint_from_its_zero_shards(trained, tmp_path, capfd):
    """The mid-run checkpoint (ZeRO-2 shards only) becomes a loadable model; consolidating the final checkpoint's
    shards gives exactly the weights rank 0 exported from the engine."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from trainers.checkpoints import HF_DIR, consolidate

    checkpoints = sorted(glob.glob(os.path.join(trained["run_dir"], "checkpoint_*/")))
    checkpoints = [c.rstrip("/") for c in checkpoints]
    assert len(checkpoints) == 2 and not os.path.exists(os.path.join(checkpoints[0], HF_DIR))
    out = str(tmp_path / "step8")
    capfd.readouterr()
    assert main(["export", trained["run_dir"], "--checkpoint", checkpoints[0], "--out", out]) == 0
    log = os.path.join(trained["run_dir"], "logs", "export.log")
    assert capfd.readouterr() == (f"exported {checkpoints[0]} to {out} (log: {log})\n", "")  # DeepSpeed's: below
    assert "Processing zero checkpoint" in open(log).read()
    mid = AutoModelForCausalLM.from_pretrained(out)
    final = load_file(os.path.join(trained["run_dir"], "model", "model.safetensors"))
    assert not torch.allclose(mid.model.embed_tokens.weight, final["model.embed_tokens.weight"])

    rebuilt, _ = consolidate(checkpoints[1])
    state = rebuilt.state_dict()
    for key, value in final.items():
        assert torch.equal(state[key], value), key


@pytest.mark.reliability("bad input", "a checkpoint holding a pickled object")
def test_export_refuses_a_checkpoint_that_fails_the_weights_only_check(trained, tmp_path):
    import shutil

    import torch

    source = sorted(glob.glob(os.path.join(trained["run_dir"], "checkpoint_*/")))[0]
    bad = tmp_path / "tampered"
    shutil.copytree(source, bad)
    # a pickle that would hand os.system to whoever unpickles it
    torch.save({"optimizer_state_dict": os.system}, bad / "ds" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert main(["export", trained["run_dir"], "--checkpoint", str(bad), "--out", str(tmp_path / "out")]) == 2
    assert not os.path.exists(tmp_path / "out")


def test_eval_scores_the_exported_model_on_the_test_split(trained, prepared_data, capsys):
    """`zeray eval` on 1 and 3 workers, each scoring its share of the split: the same numbers as each other and as
    the 2-worker run's own (sharded) test evaluation; the 3 workers read the split `zeray prep` wrote of the same
    data, which holds the rows the run's streamed pipeline made."""
    with open(os.path.join(trained["run_dir"], "summary.json")) as f:
        summary = json.load(f)
    results = {}
    for workers in (1, 3):
        capsys.readouterr()
        model = os.path.join(trained["run_dir"], "model")
        # (half a CPU each: 3 workers and Ray Data's 2 CPUs in the session's 4)
        overrides = [f"train.num_workers={workers}", "train.cpus_per_worker=0.5"]
        if workers == 3:
            overrides += [f"data.prepared={prepared_data}", "data.train=null"]
        assert main(["eval", trained["config"], *overrides, "--model", model]) == 0
        out = capsys.readouterr().out
        results[workers] = json.loads(out[out.index("{") :])
    for result in results.values():
        assert result["test_loss"] == pytest.approx(summary["test_loss"], rel=1e-6)
        assert result["test_token_accuracy"] == pytest.approx(summary["test_token_accuracy"], rel=1e-6)
        assert result["test_tokens"] == results[1]["test_tokens"] > 0
    assert results[1]["test_perplexity"] == pytest.approx(math.exp(summary["test_loss"]), rel=1e-6)


@pytest.mark.slow
def test_best_checkpoint_is_the_model_and_only_the_best_are_kept(artifacts, prepared_data, tmp_path, capsys):
    """A learning rate that blows the model up after a few steps: the exported model is the early checkpoint
    that validated best, tested on its own, and only the best `keep_checkpoints` plus the latest remain."""
    from safetensors.torch import load_file

    from trainers.checkpoints import consolidate

    config = write_config(
        tmp_path / "blowup.yaml",
        name="blowup",
        storage=str(tmp_path / "runs"),
        data={"prepared": prepared_data},
        model={"name_or_path": artifacts["model"]},
        train={
            "num_workers": 2,
            "max_steps": 12,
            "micro_batch_size": 8,
            "lr": 3.0e-3,
            "zero_stage": 1,
            "warmup_ratio": 0.5,
            "lr_schedule": "constant",
            "grad_clip": 0.0,
            "weight_decay": 0.0,
            "eval_every": 100,
            "checkpoint_every": 3,
            "keep_checkpoints": 1,
            "log_every": 3,
        },
    )
    # steps 1-6 warm up gently; then lr 10 wrecks the weights
    assert main(["train", config, "train.lr=10.0"]) == 0
    run_dir = tmp_path / "runs" / "blowup"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["model_step"] < summary["steps"] == 12
    assert summary["eval_loss"] < summary["final_eval_loss"]
    evals = {r["step"]: r["eval_loss"] for r in map(json.loads, open(run_dir / "metrics.jsonl")) if "eval_loss" in r}
    assert sorted(evals) == [3, 6, 9, 12]  # every checkpoint was validated
    assert summary["eval_loss"] == min(evals.values()) == evals[summary["model_step"]]
    # the model is that checkpoint's weights, and its test loss was measured on it
    model, _ = consolidate(summary["checkpoint"])
    exported = load_file(str(run_dir / "model" / "model.safetensors"))
    state = model.state_dict()
    assert exported and set(exported) <= set(state)  # tied weights (lm_head) are stored once
    for name, tensor in exported.items():
        assert (tensor - state[name]).abs().max().item() == 0.0, name
    capsys.readouterr()
    assert main(["eval", config, "--model", str(run_dir / "model")]) == 0
    out = capsys.readouterr().out
    tested = json.loads(out[out.index("{") :])
    assert tested["test_loss"] == pytest.approx(summary["test_loss"], rel=1e-6)
    kept = sorted(p for p in glob.glob(str(run_dir / "checkpoint_*")) if os.path.isdir(p))
    assert len(kept) == 2 and summary["checkpoint"] in kept  # the best one and the latest


@pytest.mark.slow
def test_zero0_trains_resumes_and_exports(artifacts, prepared_data, tmp_path):
    """6 steps at ZeRO-0, then the same run extended to 9 resumes from its step-6 checkpoint; the exported model
    holds exactly the weights consolidated from the DeepSpeed files, and loads. (The other stages: ZeRO-1, the
    truncated-checkpoint run; ZeRO-2, the `trained` run and test_storage's; ZeRO-3 with CPU offload,
    test_resume's runs; ZeRO-3 without, the LoRA kill.)"""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from trainers.checkpoints import consolidate

    config = write_config(
        tmp_path / "stage0.yaml",
        name="stage0",
        storage=str(tmp_path / "runs"),
        data={"prepared": prepared_data},
        model={"name_or_path": artifacts["model"]},
        train={
            "num_workers": 2,
            "max_steps": 6,
            "micro_batch_size": 4,
            "lr": 3.0e-3,
            "zero_stage": 0,
            "eval_every": 100,
            "checkpoint_every": 3,
            "log_every": 3,
        },
    )
    assert main(["train", config]) == 0
    assert main(["train", config, "train.max_steps=9"]) == 0
    run_dir = tmp_path / "runs" / "stage0"
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert [r["step"] for r in rows if "loss" in r] == [3, 6, 9]  # the second run went on from step 6
    assert [r["step"] for r in rows if "base_eval_loss" in r] == [0]  # the base evaluated once, not on resuming
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 9 and summary["zero_stage"] == 0
    model, _ = consolidate(summary["checkpoint"])
    exported = load_file(str(run_dir / "model" / "model.safetensors"))
    state = model.state_dict()
    for name, tensor in exported.items():
        assert (tensor - state[name]).abs().max().item() == 0.0, name
    loaded = AutoModelForCausalLM.from_pretrained(str(run_dir / "model"), use_safetensors=True)
    assert all(bool((t == state[k]).all()) for k, t in loaded.state_dict().items())  # tied lm_head included


@pytest.mark.slow
def test_one_and_two_workers_give_the_same_loss_curve(trained, prepared_data, tmp_path):
    """The same data and global batch (1 x 16 rows, or the `trained` run's 2 workers x 8) give the same loss at
    every logged step; the one worker with the plain loss and without checkpointing, the two with the chunked loss
    and gradient checkpointing (at ZeRO-2). The one worker reads the same data as `zeray prep` wrote it."""
    # the same run on one worker, with the plain loss, no checkpointing and no trackers
    one = [
        "name=w1",
        f"storage={tmp_path / 'runs'}",
        f"data.prepared={prepared_data}",
        "data.train=null",
        "train.num_workers=1",
        "train.micro_batch_size=16",
        "train.chunked_loss=false",
        "train.gradient_checkpointing=false",
        "train.tensorboard=false",
        "train.mlflow_uri=null",
        "train.wandb_project=null",
    ]
    assert main(["train", trained["config"], *one]) == 0
    losses, bases = {}, {}
    for workers, run_dir in ((1, str(tmp_path / "runs" / "w1")), (2, trained["run_dir"])):
        rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
        losses[workers] = [r["loss"] for r in rows if "loss" in r]
        bases[workers] = [r["base_eval_loss"] for r in rows if "base_eval_loss" in r]
        summary = json.loads(open(os.path.join(run_dir, "summary.json")).read())
        assert summary["chunked_loss"] is summary["gradient_checkpointing"] is (workers == 2)
    assert len(losses[1]) == len(losses[2]) == 4
    assert losses[2] == pytest.approx(losses[1], rel=1e-4)
    assert len(bases[1]) == 1 and bases[2] == pytest.approx(bases[1], abs=1e-6)  # shared evaluation, same number
    assert losses[1][-1] < losses[1][0]
