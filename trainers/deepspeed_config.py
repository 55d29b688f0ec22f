"""The DeepSpeed config zeray builds from the `train:` and `model:` sections, merged over the user's own
DeepSpeed JSON (`train.deepspeed`) when one is given."""

import json

from core.errors import UserError
from trainers.config import ModelConfig, TrainConfig

# What zeray sets and where a user changes it instead (a DeepSpeed file may repeat these only with equal values).
CONTROLLED = {
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "train_batch_size": "train.micro_batch_size x train.grad_accum x train.num_workers (its max if elastic)",
    "gradient_clipping": "train.grad_clip",
    "zero_optimization.stage": "train.zero_stage",
    "zero_optimization.offload_optimizer.device": "train.offload",
    "zero_optimization.offload_param.device": "train.offload",
    "optimizer": "train.lr / train.weight_decay (zeray's AdamW)",
    "bf16.enabled": "model.dtype",
    "fp16.enabled": "model.dtype",
}
# zeray's defaults that a DeepSpeed file may override
OVERRIDABLE = {
    "steps_per_print",
    "wall_clock_breakdown",
    "zero_optimization.reduce_bucket_size",
    "zero_optimization.allgather_bucket_size",
    "zero_optimization.stage3_prefetch_bucket_size",
    "zero_optimization.stage3_param_persistence_threshold",
    "zero_optimization.offload_optimizer.pin_memory",
    "zero_optimization.offload_param.pin_memory",
}


def load_user_deepspeed(path: str) -> dict:
    """The user's DeepSpeed JSON (`train.deepspeed`), checked to be an object zeray can merge."""
    try:
        with open(path, encoding="utf-8") as f:
            user = json.load(f)
    except FileNotFoundError:
        raise UserError(f"train.deepspeed: {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"train.deepspeed: {path} is not valid JSON: {exc}") from None
    if not isinstance(user, dict):
        raise UserError(f"train.deepspeed: {path} must hold a JSON object of DeepSpeed settings")
    if "scheduler" in user:
        raise UserError(
            f"train.deepspeed: {path} sets scheduler, but zeray builds the schedule from "
            "train.lr_schedule and train.warmup_ratio; remove it from the file"
        )
    return user


def merge_user(user: dict, ours: dict, path: str, prefix: str = "") -> dict:
    """`ours` over `user`: the user's extra settings stay; a setting zeray controls must be absent or equal."""
    out = dict(user)
    for key, value in ours.items():
        name = prefix + key
        if key not in user:
            out[key] = value
        elif name in OVERRIDABLE:
            out[key] = user[key]
        elif isinstance(value, dict) and isinstance(user[key], dict) and name != "optimizer":
            out[key] = merge_user(user[key], value, path, name + ".")
        elif user[key] != value:
            owner = CONTROLLED.get(name, "the run config")
            raise UserError(
                f"train.deepspeed: {path} sets {name}={json.dumps(user[key])} but zeray sets "
                f"{json.dumps(value)} from {owner}; remove it from the file or change {owner}"
            )
    return out


def precision(model: ModelConfig, on_gpu: bool, bf16_supported: bool) -> str:
    """fp32 | bf16 | fp16; `auto` is bf16 where the GPU supports it and fp32 on CPU (CPU half precision is slow)."""
    if model.dtype != "auto":
        return model.dtype
    return "bf16" if on_gpu and bf16_supported else "fp32"


def deepspeed_config(
    train: TrainConfig,
    world_size: int,
    dtype: str,
    hidden_size: int,
    user: dict | None = None,
    grad_accum: int | None = None,
    load_universal: bool = False,
) -> dict:
    """`grad_accum`: micro-batches per rank per step when an elastic run has fewer than its max workers (more
    each, for the same global batch); `load_universal`: the checkpoint to load was converted by ds_to_universal."""
    grad_accum = grad_accum or train.grad_accum
    if user and grad_accum != train.grad_accum:  # checked against the full-size run on the driver already
        user = {k: v for k, v in user.items() if k not in ("gradient_accumulation_steps", "train_batch_size")}
    zero: dict = {"stage": train.zero_stage}
    if train.zero_stage > 0:
        # DeepSpeed's bucket defaults (5e8 elements) are sized for billion-parameter models: ZeRO-3 allocates them
        # whole (2 GB per worker in fp32 even for a 4M model), and ZeRO-1/2 hold a 135M model's gradients until the
        # whole backward is done (SmolLM2 on 2 CPU workers: 129 -> 147 tokens/s with hidden^2, docs/benchmarks.md).
        # Size them to the model like Hugging Face's "auto" values (hidden^2), with a floor so small models do not
        # pay for many tiny collectives.
        bucket = max(hidden_size * hidden_size, 1 << 20 if train.zero_stage == 3 else 1 << 24)
        zero["reduce_bucket_size"] = bucket
        if train.zero_stage == 3:
            zero["stage3_prefetch_bucket_size"] = int(0.9 * bucket)
            zero["stage3_param_persistence_threshold"] = 10 * hidden_size
        else:
            zero["allgather_bucket_size"] = bucket
    if train.offload == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
        if train.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    optimizer_params = {"lr": train.lr, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": train.weight_decay}
    if train.offload != "cpu":
        # torch's AdamW: DeepSpeed's fused Adam is a CUDA kernel; with offload DeepSpeed picks its CPU Adam.
        optimizer_params["torch_adam"] = True
    ours = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": train.micro_batch_size * grad_accum * world_size,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": optimizer_params},
        "bf16": {"enabled": dtype == "bf16"},
        "fp16": {"enabled": dtype == "fp16"},
        "steps_per_print": 1 << 30,  # zeray prints its own progress line
        "wall_clock_breakdown": False,
    }
    if load_universal:
        ours["checkpoint"] = {"load_universal": True}
    return merge_user(user, ours, train.deepspeed) if user else ours
