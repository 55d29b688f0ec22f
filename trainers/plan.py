"""`zeray plan`: memory per device for every ZeRO stage and offload choice, before anything is launched.

Model states (parameters, gradients, optimizer states) follow DeepSpeed's accounting: its own estimators for
mixed-precision ZeRO-2 and ZeRO-3 (`estimate_zero{2,3}_model_states_mem_needs`), and the same per-parameter
bytes for the stages it has no estimator for (0 and 1) and for fp32 training. Activations are estimated for one
micro-batch at `max_length` (Korthikanti et al. 2022): whole layers, or with gradient checkpointing one hidden state
per layer plus the one layer being recomputed; plus the fp32 logits and their gradient, for the whole micro-batch or
for one chunk of the chunked loss. The device is a GPU's
memory, or on CPU the node's memory shared by the workers placed on it, where each worker process also holds its
runtime (CPU_RUNTIME). With LoRA that accounting covers the
adapters, and the frozen base adds only its working copy (sharded at stage 3).
"""

import math

import ray

from core.errors import UserError, first_line
from trainers.deepspeed_config import precision
from trainers.deepspeed_ops import import_deepspeed
from trainers.loss import chunk_tokens

GB = 1024**3
ADDITIONAL_BUFFER = 1.5  # DeepSpeed's default factor for CPU-side buffers
# What a CPU worker holds besides its model states and activations: Python, torch, transformers, DeepSpeed and Ray's
# worker, ZeRO's working buffers and the optimizer step's temporaries. Calibrated by bench/memory.py
# (docs/benchmarks.md). On a GPU the measure is torch's allocations, which leave these out.
CPU_RUNTIME = 1 * GB
CHOICES = [(0, "none"), (1, "none"), (2, "none"), (3, "none"), (2, "cpu"), (3, "cpu")]  # cheapest first


def model_shape(name_or_path: str, trust_remote_code: bool, lora=None, attn_implementation: str = "auto") -> dict:
    """Parameter counts and dimensions of the model (with its LoRA adapters, if any: `trainable` counts those),
    built on the meta device (no weights are loaded) with the attention implementation asked for."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        try:  # transformers checks the implementation against the model and what is installed
            model = AutoModelForCausalLM.from_config(
                config,
                trust_remote_code=trust_remote_code,
                attn_implementation=None if attn_implementation == "auto" else attn_implementation,
            )
        except (ImportError, ValueError) as e:
            reason = first_line(e)
            raise UserError(
                f"model.attn_implementation: {attn_implementation} cannot run {name_or_path} here ({reason}); "
                "valid: auto, sdpa, eager, flash_attention_2 (needs the flash-attn package and CUDA GPUs)"
            ) from None
        checkpointable = model.supports_gradient_checkpointing
        if lora:
            from trainers.lora import with_adapters

            model = with_adapters(model, lora, name_or_path)
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    text = config.get_text_config()
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "largest_layer_params": largest,
        "layers": text.num_hidden_layers,
        "hidden": text.hidden_size,
        "heads": text.num_attention_heads,
        "vocab": text.vocab_size,
        "checkpointable": checkpointable,
        "attn": model.config._attn_implementation,  # what `auto` resolves to for this model
    }


def model_states_bytes(
    params: int, largest_layer: int, stage: int, offload: str, world: int, mixed: bool
) -> tuple[int, int]:
    """(device bytes, CPU bytes per node) for parameters, gradients and AdamW states on each worker."""
    import_deepspeed()
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    cpu_offload = offload == "cpu"
    if mixed and stage == 2:
        cpu, dev = estimate_zero2_model_states_mem_needs(params, num_gpus_per_node=world, cpu_offload=cpu_offload)
        return dev, cpu
    if mixed and stage == 3:
        cpu, dev, _ = estimate_zero3_model_states_mem_needs(
            params, largest_layer, num_gpus_per_node=world, cpu_offload=cpu_offload, cpu_offload_params=cpu_offload
        )
        return dev, cpu
    # bytes per parameter: working weights + their gradients, then what ZeRO shards from stage 1 on: fp32 master
    # weights, fp32 gradients when mixed, and AdamW's two moments. ZeRO-1/2 keep their own fp32 master partition
    # even when the working weights are fp32 (measured by bench/train.py), so fp32 shards 12 bytes there; ZeRO-3
    # steps an fp32 parameter partition in place (trainers/deepspeed_fixes.py) unless the optimizer is offloaded.
    working = 4 if mixed else 8  # 16-bit weights + 16-bit grads, or fp32 weights + fp32 grads
    sharded = 16 if mixed else 12  # fp32 master weights (+ fp32 grads when mixed) + 2 moments
    offloaded = 16  # on the CPU with offload: fp32 master weights, grads and 2 moments
    if stage == 0:  # no ZeRO optimizer: torch's AdamW updates the weights themselves
        return (working + (sharded if mixed else 8)) * params, 0
    if stage == 1:
        dev = working * params + (0 if cpu_offload else sharded * params // world)
        return dev, int(offloaded * params * ADDITIONAL_BUFFER) if cpu_offload else 0
    if stage == 2:
        grads = working // 2
        dev = (working - grads) * params + grads * params // world + (0 if cpu_offload else sharded * params // world)
        return dev, int(offloaded * params * ADDITIONAL_BUFFER) if cpu_offload else 0
    # stage 3, fp32: everything sharded; offload moves all of it to CPU but the layer being computed
    if cpu_offload:
        return 4 * largest_layer, int((working + sharded) * params * ADDITIONAL_BUFFER)
    return (working + (sharded if mixed else 8)) * params // world + 4 * largest_layer, 0


def shape_states_bytes(shape: dict, stage: int, offload: str, world: int, mixed: bool) -> tuple[int, int]:
    """`model_states_bytes` for the trainable parameters, plus the working copy of the frozen ones (a LoRA base),
    sharded at stage 3 and offloaded with the parameters there."""
    dev, cpu = model_states_bytes(shape["trainable"], shape["largest_layer_params"], stage, offload, world, mixed)
    frozen = (shape["params"] - shape["trainable"]) * (2 if mixed else 4)
    if stage == 3 and offload == "cpu":
        return dev, cpu + frozen
    return dev + (frozen // world if stage == 3 else frozen), cpu


def activation_bytes(
    shape: dict, micro_batch: int, seq: int, bytes_per_value: int, checkpointing: bool, chunked: bool
) -> int:
    """Activations kept for backward in one micro-batch, plus the logits and their gradient in fp32."""
    b, s, h, a = micro_batch, seq, shape["hidden"], shape["heads"]
    # the paper counts 16-bit values; only eager attention keeps the [s x s] scores and softmax per head (sdpa's
    # and flash-attention's kernels keep the output and a row statistic)
    scores = 5 * a * s / h if shape["attn"] == "eager" else 0
    per_layer = b * s * h * (34 + scores) * bytes_per_value / 2
    # checkpointed: each layer's input, and during the backward the whole of the layer being recomputed
    layers = shape["layers"] * b * s * h * bytes_per_value + per_layer if checkpointing else shape["layers"] * per_layer
    tokens = chunk_tokens(b * s, h, shape["vocab"]) if chunked else b * s
    return int(layers + 2 * tokens * shape["vocab"] * 4)


def device_memory(use_gpu: bool, workers: int) -> tuple[int | None, str]:
    """Memory of one worker's device: a GPU's (asked of a GPU in the cluster), or its share of a node's RAM."""
    if use_gpu:

        @ray.remote(num_gpus=1, num_cpus=0)
        def gpu_memory() -> tuple[int, str]:
            import torch

            props = torch.cuda.get_device_properties(0)
            return props.total_memory, props.name

        ref = gpu_memory.remote()
        try:
            total, name = ray.get(ref, timeout=60)
            return total, f"GPU {name}"
        except ray.exceptions.GetTimeoutError:
            ray.cancel(ref, force=True)  # or it waits on, holding a GPU node up
            return None, "a GPU (none was free within 60 s to measure)"
    nodes = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) > 0]
    if not nodes:  # an autoscaling cluster before its worker nodes come up
        return None, "CPU (no worker node is up yet to measure)"
    memory = min(n["Resources"].get("memory", 0) for n in nodes)
    per_node = math.ceil(workers / len(nodes))
    return int(memory / per_node), f"CPU: {per_node} worker(s) sharing a node's {memory / GB:.1f} GB"


def make_memory_plan(cfg, use_gpu: bool) -> dict:
    """Every stage/offload choice with its memory per device, whether it fits, and the cheapest that does."""
    t, d = cfg.train, cfg.data
    m = cfg.model
    shape = model_shape(m.name_or_path, m.trust_remote_code, m.lora, m.attn_implementation)
    if m.attn_implementation == "flash_attention_2" and not use_gpu:
        raise UserError("model.attn_implementation: flash_attention_2 needs CUDA GPUs (train.use_gpu); on CPU use sdpa")
    if t.gradient_checkpointing and not shape["checkpointable"]:
        raise UserError(
            f"train.gradient_checkpointing: {m.name_or_path} does not support gradient checkpointing in "
            "transformers; set it to false"
        )
    dtype = precision(m, use_gpu, use_gpu)  # bf16 support is checked again on the workers
    mixed = dtype != "fp32"
    # an elastic run's worst case: states sharded over its fewest workers, a node's RAM shared by its most
    device_bytes, device = device_memory(use_gpu, t.max_workers)

    def rows_for(checkpointing: bool) -> list[dict]:
        act = activation_bytes(
            shape, t.micro_batch_size, d.max_length, 2 if mixed else 4, checkpointing, t.chunked_loss
        )
        rows = []
        runtime = 0 if use_gpu else CPU_RUNTIME
        for stage, offload in CHOICES:
            states, cpu = shape_states_bytes(shape, stage, offload, t.min_workers, mixed)
            # on CPU the "device" is the node's memory, which also holds what is offloaded
            need = states + act + runtime + (0 if use_gpu else cpu // t.min_workers)
            rows.append(
                {
                    "zero_stage": stage,
                    "offload": offload,
                    "model_states_gb": states / GB,
                    "offloaded_cpu_gb": cpu / GB,
                    "activations_gb": act / GB,
                    "runtime_gb": runtime / GB,
                    "total_gb": need / GB,
                    "fits": None if device_bytes is None else need <= device_bytes,
                }
            )
        return rows

    rows = rows_for(t.gradient_checkpointing)
    chosen = next(r for r in rows if (r["zero_stage"], r["offload"]) == (t.zero_stage, t.offload))
    cheapest = next((r for r in rows if r["fits"]), None)
    # what turning gradient checkpointing on would give (when it is off)
    checkpointed = None if t.gradient_checkpointing else rows_for(True)
    # PaLM's training FLOPs per token: 6N for the weights, 12*L*H*T for attention over T positions
    flops_per_token = 6 * shape["params"] + 12 * shape["layers"] * shape["hidden"] * d.max_length
    return {
        "params": shape["params"],
        "hidden": shape["hidden"],
        "precision": dtype,
        "flops_per_token": flops_per_token,
        "device": device,
        "device_gb": None if device_bytes is None else device_bytes / GB,
        "rows": rows,
        "chosen": chosen,
        "cheapest": cheapest,
        "checkpointing": t.gradient_checkpointing,
        "chosen_checkpointed": checkpointed
        and next(r for r in checkpointed if r["zero_stage"] == t.zero_stage and r["offload"] == t.offload),
        "cheapest_checkpointed": checkpointed and next((r for r in checkpointed if r["fits"]), None),
        "tokens_per_step": t.max_workers * t.micro_batch_size * t.grad_accum * d.max_length,
    }


def explain(plan: dict) -> str:
    """Why a run does not fit, and what would."""
    c, cheapest, checkpointed = plan["chosen"], plan["cheapest"], plan["cheapest_checkpointed"]
    fixes = []
    if plan["chosen_checkpointed"] and plan["chosen_checkpointed"]["fits"]:
        fixes.append(f"train.gradient_checkpointing=true fits ({plan['chosen_checkpointed']['total_gb']:.2f} GB)")
    if cheapest:
        fixes.append(
            f"train.zero_stage={cheapest['zero_stage']} train.offload={cheapest['offload']} fits "
            f"({cheapest['total_gb']:.2f} GB)"
        )
    elif checkpointed and not fixes:
        fixes.append(
            f"only with gradient checkpointing: train.gradient_checkpointing=true "
            f"train.zero_stage={checkpointed['zero_stage']} train.offload={checkpointed['offload']} fits "
            f"({checkpointed['total_gb']:.2f} GB)"
        )
    fix = (
        "; or ".join(fixes)
        if fixes
        else "no ZeRO stage or offload fits; lower train.micro_batch_size or data.max_length, or add workers"
    )
    runtime = f" + {c['runtime_gb']:.2f} runtime" if c["runtime_gb"] else ""
    return (
        f"train.zero_stage={c['zero_stage']} train.offload={c['offload']} needs {c['total_gb']:.2f} GB per "
        f"worker ({c['model_states_gb']:.2f} model states + {c['activations_gb']:.2f} activations{runtime}) but the "
        f"device has {plan['device_gb']:.2f} GB ({plan['device']}); {fix}"
    )


def format_plan(plan: dict) -> str:
    lines = [
        f"model: {plan['params'] / 1e6:.1f}M parameters, {plan['precision']}; device: {plan['device']}"
        + (f", {plan['device_gb']:.2f} GB" if plan["device_gb"] is not None else ""),
        f"{'stage':>5} {'offload':>7} {'states GB':>10} {'activ. GB':>10} {'total GB':>9} {'CPU GB':>8}  fits",
    ]
    for r in plan["rows"]:
        mark = " <- configured" if r is plan["chosen"] else ""
        fits = "?" if r["fits"] is None else ("yes" if r["fits"] else "no")
        lines.append(
            f"{r['zero_stage']:>5} {r['offload']:>7} {r['model_states_gb']:>10.3f} "
            f"{r['activations_gb']:>10.3f} {r['total_gb']:>9.3f} {r['offloaded_cpu_gb']:>8.3f}  {fits}{mark}"
        )
    cheapest = plan["cheapest"]
    lines.append(
        "cheapest that fits: "
        + (f"ZeRO {cheapest['zero_stage']}, offload {cheapest['offload']}" if cheapest else "none")
    )
    other = plan["chosen_checkpointed"]
    lines.append(
        f"activations per micro-batch: {plan['chosen']['activations_gb']:.3f} GB "
        + (
            "with gradient checkpointing"
            if plan["checkpointing"]
            else f"({other['activations_gb']:.3f} GB with train.gradient_checkpointing=true)"
        )
    )
    if plan["chosen"]["runtime_gb"]:
        lines.append(
            f"total: also {plan['chosen']['runtime_gb']:.2f} GB per worker process for Python, torch, DeepSpeed and "
            "Ray on CPU, and what is offloaded (CPU GB) shared by the node's workers"
        )
    lines.append(f"tokens per optimizer step (slots): {plan['tokens_per_step']}")
    return "\n".join(lines)
