"""The DeepSpeed config zeray builds from the `train:` and `model:` sections."""

from trainers.config import ModelConfig, TrainConfig


def precision(model: ModelConfig, on_gpu: bool, bf16_supported: bool) -> str:
    """fp32 | bf16 | fp16; `auto` is bf16 where the GPU supports it and fp32 on CPU (CPU half precision is slow)."""
    if model.dtype != "auto":
        return model.dtype
    return "bf16" if on_gpu and bf16_supported else "fp32"


def deepspeed_config(train: TrainConfig, world_size: int, dtype: str, hidden_size: int) -> dict:
    zero: dict = {"stage": train.zero_stage}
    if train.zero_stage == 3:
        # ZeRO-3 allocates its communication buckets whole, and DeepSpeed's default (5e8 elements) is sized for
        # billion-parameter models: 2 GB per worker in fp32 even for a 4M model. Size them to the model like
        # Hugging Face's "auto" values (hidden^2), with a floor so small models do not pay for many tiny
        # collectives. ZeRO-1/2 allocate as they go, and keep DeepSpeed's defaults.
        bucket = max(hidden_size * hidden_size, 1 << 20)
        zero.update({"reduce_bucket_size": bucket, "stage3_prefetch_bucket_size": int(0.9 * bucket),
                     "stage3_param_persistence_threshold": 10 * hidden_size})
    if train.offload == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
        if train.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    optimizer_params = {"lr": train.lr, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": train.weight_decay}
    if train.offload != "cpu":
        # torch's AdamW: DeepSpeed's fused Adam is a CUDA kernel; with offload DeepSpeed picks its CPU Adam.
        optimizer_params["torch_adam"] = True
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.micro_batch_size * train.grad_accum * world_size,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": optimizer_params},
        "bf16": {"enabled": dtype == "bf16"},
        "fp16": {"enabled": dtype == "fp16"},
        "steps_per_print": 1 << 30,  # zeray prints its own progress line
        "wall_clock_breakdown": False,
    }
