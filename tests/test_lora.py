"""LoRA (`model.lora`): adapters train under every ZeRO stage while the base stays frozen, export merged or
adapter-only from any checkpoint, and a run with adapter dropout killed mid-run resumes to identical weights."""

import json
import random
import threading

import pytest
import torch
from conftest import write_config

from zeray.cli import main

pytestmark = pytest.mark.integration

TARGETS = ("q_proj", "v_proj")


def lora_config(root, name, artifacts, prepared, **train):
    return write_config(
        root / f"{name}.yaml",
        name=name,
        storage=str(root / "runs"),
        data={"prepared": prepared},
        model={
            "name_or_path": artifacts["model"],
            "lora": {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": list(TARGETS)},
        },
        train={
            "num_workers": 2,
            "micro_batch_size": 8,
            "lr": 2.0e-2,
            "warmup_ratio": 0.0,
            "eval_every": 1000,
            "log_every": 2,
            **train,
        },
    )


def logits(model_dir: str) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True).eval()
    with torch.no_grad():
        return model(input_ids=torch.arange(3, 40)[None]).logits


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_lora_trains_only_adapters_and_exports_merged_or_adapter_only(artifacts, prepared_data, tmp_path, stage):
    from safetensors.torch import load_file

    config = lora_config(
        tmp_path, f"lora{stage}", artifacts, prepared_data, zero_stage=stage, max_steps=6, checkpoint_every=3
    )
    assert main(["train", config]) == 0
    run = tmp_path / "runs" / f"lora{stage}"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["eval_loss"] < summary["first_loss"]

    # model/ is the merged model: the targeted projections moved, every other weight is the base's exactly
    base = load_file(f"{artifacts['model']}/model.safetensors")
    merged = load_file(str(run / "model" / "model.safetensors"))
    assert sorted(merged) == sorted(base)
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed == {k for k in base if k.endswith(tuple(f"{t}.weight" for t in TARGETS))}

    # the same checkpoint exported as adapters alone (consolidated from its DeepSpeed files, not the loop's
    # export): loaded on the base it names, it computes what the merged model computes
    assert (
        main(
            [
                "export",
                str(run),
                "--checkpoint",
                summary["checkpoint"],
                "--out",
                str(tmp_path / "adapter"),
                "--lora",
                "adapter",
            ]
        )
        == 0
    )
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == artifacts["model"] and adapter_config["r"] == 4
    assert sorted(load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))) == sorted(
        f"base_model.model.{k[: -len('.weight')]}.lora_{ab}.weight" for k in changed for ab in "AB"
    )
    assert torch.allclose(logits(str(tmp_path / "adapter")), logits(str(run / "model")), atol=1e-5)

    # an earlier checkpoint, merged from its DeepSpeed files: the base kept, the adapters of step 3 in
    earlier = sorted(str(p) for p in run.glob("checkpoint_*") if p.is_dir() and str(p) != summary["checkpoint"])
    assert main(["export", str(run), "--checkpoint", earlier[0], "--out", str(tmp_path / "step3")]) == 0
    step3 = load_file(str(tmp_path / "step3" / "model.safetensors"))
    assert {k for k in base if not torch.equal(base[k], step3[k])} == changed
    assert all(not torch.equal(step3[k], merged[k]) for k in changed)


@pytest.mark.slow
@pytest.mark.reliability(
    "fault",
    "a worker of a LoRA run (ZeRO-3, adapter dropout, gradient checkpointing) SIGKILLed at step 10 or later of 16",
)
def test_lora_under_zero3_killed_mid_run_resumes_to_identical_weights(artifacts, prepared_data, tmp_path, capsys):
    """Adapter dropout draws random numbers every step: a run resumed from its checkpoint must draw the same ones
    as the run that wrote it (each rank reseeds at every checkpoint), or the weights would differ. The killed run
    recomputes its activations (gradient checkpointing, behind frozen inputs) where the straight one keeps them."""
    from conftest import paced
    from test_resume import assert_same_run, kill_workers_at, logged_steps

    train = dict(zero_stage=3, max_steps=16, checkpoint_every=4, max_failures=2)
    assert main(["train", lora_config(tmp_path, "straight", artifacts, prepared_data, **train)]) == 0
    done: list = []
    killer = threading.Thread(
        target=kill_workers_at, daemon=True, args=(str(tmp_path / "runs" / "killed"), [10], done, random.Random(0))
    )
    killer.start()
    with paced():
        config = lora_config(tmp_path, "killed", artifacts, prepared_data, gradient_checkpointing=True, **train)
        assert main(["train", config]) == 0
    killer.join(timeout=5)
    assert len(done) == 1 and done[0][0] < 16, done
    straight, killed = tmp_path / "runs" / "straight", tmp_path / "runs" / "killed"
    steps = logged_steps(str(killed))
    if done[0][0] % 4:  # killed between checkpoints: it went back to the last one and did those steps again
        assert any(b <= a for a, b in zip(steps, steps[1:])), steps
    assert_same_run(killed, straight)  # every step's loss, and the merged weights

    # and the adapter-only model is scored by `zeray eval` like any model directory, as the merged one was
    assert main(["export", str(killed), "--out", str(tmp_path / "adapter"), "--lora", "adapter"]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "killed.yaml"), "--model", str(tmp_path / "adapter")]) == 0
    out = capsys.readouterr().out
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["gradient_checkpointing"] is True
    assert json.loads(out[out.index("{") :])["test_loss"] == pytest.approx(summary["test_loss"], rel=1e-4)
