"""`zeray plan`: model-state memory agrees with DeepSpeed's own estimators, and a run that cannot fit is refused
before any worker starts, with the stage that would fit."""

import itertools

import pytest
from conftest import write_config

from trainers.plan import activation_bytes, model_states_bytes
from zeray.cli import main

P, LARGEST = 7_000_000_000, 260_000_000


def test_activations_with_gradient_checkpointing_and_the_chunked_loss():
    shape = {"layers": 32, "hidden": 4096, "heads": 32, "vocab": 32_000, "attn": "eager"}  # a 7B Llama
    b, s = 1, 4096
    per_layer = b * s * 4096 * (34 + 5 * 32 * s / 4096)  # 16-bit values: bytes = values x 2 / 2
    logits = 2 * b * s * 32_000 * 4
    assert activation_bytes(shape, b, s, 2, False, False) == int(32 * per_layer + logits)
    # checkpointed: a 16-bit hidden state per layer, plus one layer being recomputed
    assert activation_bytes(shape, b, s, 2, True, False) == int(32 * b * s * 4096 * 2 + per_layer + logits)
    # chunked: the logits of one chunk of tokens (4096 / ceil(32000 / 4096) = 512) and their gradient
    assert activation_bytes(shape, b, s, 2, True, True) == int(32 * b * s * 4096 * 2 + per_layer + 2 * 512 * 32_000 * 4)
    assert activation_bytes(shape, b, s, 2, True, True) < 0.1 * activation_bytes(shape, b, s, 2, False, False)
    # sdpa and flash-attention keep no [s x s] scores
    sdpa = dict(shape, attn="sdpa")
    assert activation_bytes(sdpa, b, s, 2, False, False) == int(32 * b * s * 4096 * 34 + logits)


@pytest.mark.parametrize("offload", ["none", "cpu"])
def test_mixed_precision_stages_2_and_3_are_deepspeeds_estimates(offload):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    on = offload == "cpu"
    cpu, dev = estimate_zero2_model_states_mem_needs(P, num_gpus_per_node=8, cpu_offload=on)
    assert model_states_bytes(P, LARGEST, 2, offload, 8, mixed=True) == (dev, cpu)
    cpu, dev, _ = estimate_zero3_model_states_mem_needs(
        P, LARGEST, num_gpus_per_node=8, cpu_offload=on, cpu_offload_params=on
    )
    assert model_states_bytes(P, LARGEST, 3, offload, 8, mixed=True) == (dev, cpu)


def test_stages_without_an_estimator_use_the_same_bytes_per_parameter():
    # mixed precision: 2 (16-bit weights) + 2 (16-bit grads) + 16 (fp32 weights, grads, two moments)
    assert model_states_bytes(P, LARGEST, 0, "none", 8, mixed=True) == (20 * P, 0)
    assert model_states_bytes(P, LARGEST, 1, "none", 8, mixed=True) == (4 * P + 16 * P // 8, 0)
    # stage 2 here agrees with DeepSpeed's formula (2P + 18P/N) up to rounding
    dev, _ = model_states_bytes(P, LARGEST, 2, "none", 8, mixed=True)
    assert dev == 2 * P + int(18 * P / 8)
    # fp32: weights + grads (8) and two moments (8); at stages 1 and 2 DeepSpeed's own fp32 master copy (4) too,
    # at stage 3 the optimizer steps the fp32 parameter partition itself (trainers/deepspeed_fixes.py)
    assert model_states_bytes(P, LARGEST, 0, "none", 2, mixed=False) == (16 * P, 0)
    assert model_states_bytes(P, LARGEST, 2, "none", 2, mixed=False) == (4 * P + 4 * P // 2 + 12 * P // 2, 0)
    assert model_states_bytes(P, LARGEST, 3, "none", 2, mixed=False) == (16 * P // 2 + 4 * LARGEST, 0)
    # more sharding never needs more device memory; ZeRO-3 at 2 workers about half of stage 0
    for mixed in (False, True):
        devs = [model_states_bytes(P, LARGEST, s, "none", 2, mixed=mixed)[0] for s in (0, 1, 2, 3)]
        assert devs == sorted(devs, reverse=True)
        assert devs[3] <= 0.6 * devs[0]


@pytest.mark.integration
def test_plan_prints_every_choice_and_train_refuses_what_cannot_fit(ray_cluster, artifacts, tmp_path, capsys):
    config = write_config(
        tmp_path / "plan.yaml",
        name="plan",
        storage=str(tmp_path / "runs"),
        data={"train": artifacts["data"], "max_length": 128},
        model={"name_or_path": artifacts["model"]},
        train={"num_workers": 2, "micro_batch_size": 4, "zero_stage": 3},
    )
    assert main(["plan", config]) == 0
    out = capsys.readouterr().out
    assert "0.2M parameters, fp32" in out and "<- configured" in out
    assert out.count(" yes") == 6 and "cheapest that fits: ZeRO 0, offload none" in out
    assert "tokens per optimizer step (slots): 1024" in out
    assert "activations per micro-batch: 0.0" in out and "GB with train.gradient_checkpointing=true)" in out
    # the request against the session's 4-CPU Ray, which has no autoscaler
    assert (
        "cluster: the run needs 4 CPU (2 workers x 1 CPU + 2 CPU for Ray Data); the cluster has 4 CPU now: "
        "fits now" in out
    )
    assert main(["plan", config, "train.num_workers=3"]) == 0  # plan says it; train refuses it
    assert (
        "needs 5 CPU (3 workers x 1 CPU + 2 CPU for Ray Data); the cluster has 4 CPU now: does not fit"
        in capsys.readouterr().out
    )
    # an elastic range: the request at its max and at its min; the global batch (tokens per step) is max's
    assert main(["plan", config, "train.num_workers=[1,3]"]) == 0
    out = capsys.readouterr().out
    assert "1-3 (elastic) workers x micro-batch 4" in out and "tokens per optimizer step (slots): 1536" in out
    assert (
        "cluster: at its minimum the run needs 3 CPU (1 workers x 1 CPU + 2 CPU for Ray Data); the cluster "
        "has 4 CPU now: fits now" in out
    )

    # activations that fit only with gradient checkpointing: the error says so (and plan shows both sizes)
    import ray

    from trainers.plan import model_shape

    shape, device = model_shape(artifacts["model"], False), ray.cluster_resources()["memory"] / 2
    micro = next(b for b in itertools.count(1) if activation_bytes(shape, b, 8192, 4, False, True) > device)
    assert activation_bytes(shape, micro, 8192, 4, True, True) < 0.8 * device  # (about half: 2 layers)
    too_big = [f"train.micro_batch_size={micro}", "data.max_length=8192"]
    assert main(["train", config, *too_big]) == 2
    err = capsys.readouterr().err.strip()
    assert "train.gradient_checkpointing=true fits (" in err and "\n" not in err, err
    assert main(["plan", config, *too_big, "train.gradient_checkpointing=true"]) == 0
    out = capsys.readouterr().out
    assert (
        f"activations per micro-batch: {activation_bytes(shape, micro, 8192, 4, True, True) / 2**30:.3f} GB with" in out
    )
    assert main(["plan", config, "model.attn_implementation=flash_attention_2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: model.attn_implementation: flash_attention_2 cannot run") and "\n" not in err
    assert "valid: auto, sdpa, eager, flash_attention_2" in err

    # four times that does not fit even checkpointed (about half): the error says what to lower
    assert main(["train", config, f"train.micro_batch_size={4 * micro}", "data.max_length=8192"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: train.zero_stage=3 train.offload=none needs") and "\n" not in err
    assert "no ZeRO stage or offload fits; lower train.micro_batch_size" in err
    assert not (tmp_path / "runs" / "plan" / "metrics.jsonl").exists()  # nothing started


def test_lora_counts_adapters_as_trainable_and_the_base_as_frozen_weights(artifacts):
    import torch
    from transformers import AutoModelForCausalLM

    from trainers.config import LoraConfig
    from trainers.plan import model_shape, shape_states_bytes

    full = model_shape(artifacts["model"], False)
    assert full["trainable"] == full["params"]
    lora = model_shape(artifacts["model"], False, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    base = AutoModelForCausalLM.from_pretrained(artifacts["model"], dtype=torch.float32)
    adapted = [m for name, m in base.named_modules() if name.endswith(("q_proj", "v_proj"))]
    assert len(adapted) == 2 * base.config.num_hidden_layers
    # an adapter on Linear(in, out) is A (r x in) and B (out x r)
    assert lora["trainable"] == sum(4 * (m.in_features + m.out_features) for m in adapted)
    assert lora["params"] == full["params"] + lora["trainable"]

    for stage, offload in ((0, "none"), (2, "none"), (3, "none"), (3, "cpu")):
        assert shape_states_bytes(full, stage, offload, 2, mixed=True) == model_states_bytes(
            full["params"], full["largest_layer_params"], stage, offload, 2, mixed=True
        )
        dev, cpu = shape_states_bytes(lora, stage, offload, 2, mixed=True)
        adapters = model_states_bytes(lora["trainable"], lora["largest_layer_params"], stage, offload, 2, True)
        frozen = 2 * full["params"]  # 16-bit working weights, nothing else
        assert (dev, cpu) == (
            (adapters[0], adapters[1] + frozen)
            if offload == "cpu"
            else (adapters[0] + (frozen // 2 if stage == 3 else frozen), adapters[1])
        )
        full_dev, full_cpu = shape_states_bytes(full, stage, offload, 2, mixed=True)
        assert dev <= full_dev and dev + cpu < full_dev + full_cpu  # at stage 3 + offload only a layer is on device
