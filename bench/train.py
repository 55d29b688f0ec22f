"""Training throughput and ZeRO memory on this machine, as ratios measured in one run.

    .venv/bin/python bench/train.py [--steps 40] [--parts throughput,eval,memory]
    .venv/bin/python bench/train.py --model artifacts/smollm2

1. tokens/s (real tokens) of `zeray train` (2 workers, ZeRO 2, the demo model and data, packed) against a plain
   single-process PyTorch loop using both cores on the same rows, the same global batch and AdamW. With --model,
   on that model instead, full fine-tune and LoRA (r 16, all linear layers): the plain loop, torch DDP with 2
   processes on gloo (one thread each, like zeray's workers: what the machine's communication costs), DeepSpeed's
   engine alone in 2 such processes at ZeRO 0 and 2 (what DeepSpeed adds), and `zeray train` at ZeRO 0 and 2 (what
   zeray and Ray add), with where a full fine-tune's step goes.
2. model-state memory per worker for ZeRO 0, 1, 2 and 3 on 2 workers, on the ~27M-parameter "small" model (on the
   4M demo model ZeRO's fixed buffers would be a third of it), in fp32 and in bf16 (what GPUs train in), against
   the estimate `zeray plan` uses: the bytes held by tensors when every model state exists at once — after the
   second step's backward pass, before its optimizer step (parameters, gradients, AdamW's moments made by the first
   step, DeepSpeed's partitions and buffers). In fp32, ZeRO 1 and 2 keep a separate fp32 master partition beside
   the fp32 weights; ZeRO 3 means not to, and does not with zeray's correction (trainers/deepspeed_fixes.py).
3. evaluation wall time during `zeray train` with 2 workers against 1 (the "small" model, a validation split of a
   third of the data, the same micro-batches): each worker evaluates its share of the split, so the numbers are the
   same and the time should fall towards half. The median over six evaluations of each run.
"""

import argparse
import gc
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ray  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}  # as configs/demo.yaml


def zeray_tokens_per_s(
    root: str, data: str, model: str, steps: int, stage: int = 2, lora: bool = False, lr: float = 3e-3
) -> float:
    from zeray.cli import main

    name = f"bench-z{stage}{'-lora' if lora else ''}"
    config = os.path.join(root, f"{name}.yaml")
    with open(config, "w") as f:
        yaml.safe_dump(
            {
                "name": name,
                "storage": os.path.join(root, "runs"),
                "data": {"train": data, "format": "messages", "max_length": 512},
                "model": {"name_or_path": model, **({"lora": LORA} if lora else {})},
                "train": {
                    "num_workers": 2,
                    "max_steps": steps,
                    "micro_batch_size": 1,
                    "lr": lr,
                    "zero_stage": stage,
                    "eval_every": 10_000,
                    "checkpoint_every": 10_000,
                    "log_every": 5,
                },
            },
            f,
        )
    assert main(["train", config]) == 0
    with open(os.path.join(root, "runs", name, "summary.json")) as f:
        return json.load(f)["tokens_per_s"]  # steady windows: the first (start-up) is left out


def eval_seconds(root: str, data: str, model: str, workers: int) -> tuple[float, float]:
    """(median seconds per validation pass, its loss) of a short `zeray train` evaluating after every step."""
    from zeray.cli import main

    name = f"eval{workers}"
    config = os.path.join(root, f"{name}.yaml")
    with open(config, "w") as f:
        yaml.safe_dump(
            {
                "name": name,
                "storage": os.path.join(root, "runs"),
                "data": {"train": data, "format": "messages", "max_length": 512, "split": {"val": 0.3, "test": 0.02}},
                "model": {"name_or_path": model},
                "train": {
                    "num_workers": workers,
                    "max_steps": 6,
                    "micro_batch_size": 4,
                    "grad_accum": 2 // workers,  # the same global batch
                    "zero_stage": 2,
                    "eval_every": 1,
                    "checkpoint_every": 10_000,
                    "log_every": 1,
                },
            },
            f,
        )
    assert main(["train", config]) == 0
    with open(os.path.join(root, "runs", name, "metrics.jsonl")) as f:
        evals = [r for r in map(json.loads, f) if "eval_s" in r and not r.get("final")]
    times = sorted(r["eval_s"] for r in evals)
    return times[len(times) // 2], evals[0]["eval_loss"]


def training_rows(data: str, model_dir: str) -> list[dict]:
    """The packed 512-token training rows zeray trains on, made by zeray's own pipeline."""
    from pipelines.config import DataConfig
    from pipelines.dataset import build_splits

    return build_splits(
        DataConfig(train=data, format="messages", max_length=512), model_dir, splits=("train",)
    ).train.take_all()


def plain_model(model_dir: str, lora: bool):
    from transformers import AutoModelForCausalLM

    from trainers.config import LoraConfig
    from trainers.lora import with_adapters

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if lora:
        model = with_adapters(model, LoraConfig(**LORA), model_dir)
    return model, [p for p in model.parameters() if p.requires_grad]


def torch_engine(model, trainable: list, lr: float):
    """(model, backward, step) of plain PyTorch: AdamW, clipping at 1.0."""
    optimizer = torch.optim.AdamW(trainable, lr=lr, betas=(0.9, 0.95))

    def step() -> None:
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, lambda loss: loss.backward(), step


def timed_step(engine, picked: list[dict], times: list[float]) -> int:
    """One step on `picked` rows: forward and loss, backward, optimizer step (their seconds added to `times`).
    Its real tokens."""
    from trainers.loop import Collate
    from trainers.loss import forward, plain_sums

    model, backward, step = engine
    batch = Collate(pad_id=0, device=torch.device("cpu"), packed=True)(
        {k: [r[k] for r in picked] for k in ("input_ids", "labels", "position_ids")}
        | {"num_tokens": torch.tensor([r["num_tokens"] for r in picked]).numpy()}
    )
    labels = batch["labels"]
    marks = [time.perf_counter()]
    loss = plain_sums(forward(model, batch).logits, labels)[0] / max(int((labels[:, 1:] != -100).sum()), 1)
    marks.append(time.perf_counter())
    backward(loss)
    marks.append(time.perf_counter())
    step()
    marks.append(time.perf_counter())
    for i in range(3):
        times[i] += marks[i + 1] - marks[i]
    return int(batch["num_tokens"])


WARMUP = 5  # steps before the clock starts


def plain_tokens_per_s(rows: list[dict], model_dir: str, steps: int, lora: bool = False, lr: float = 3e-3) -> float:
    """The same packed rows, two per step (the 2 workers' global batch), in one process on both cores."""
    torch.set_num_threads(2)
    engine = torch_engine(*plain_model(model_dir, lora), lr)
    tokens, started, times = 0, 0.0, [0.0] * 3
    for step in range(steps):
        if step == WARMUP:
            tokens, started = 0, time.perf_counter()
        tokens += timed_step(engine, [rows[(2 * step + i) % len(rows)] for i in range(2)], times)
    return tokens / (time.perf_counter() - started)


def data_parallel_worker(
    rank: int, rows: list[dict], model_dir: str, kind: str, steps: int, lora: bool, lr: float, port: int, out
) -> None:
    """One of 2 processes on gloo, one thread each like a zeray worker, rank r training row 2*step + r: `kind` is
    torch DDP, or DeepSpeed's engine at ZeRO 0 or 2 with zeray's DeepSpeed config but outside Ray and zeray."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    dist.init_process_group("gloo", rank=rank, world_size=2)
    model, trainable = plain_model(model_dir, lora)
    if kind == "ddp":
        engine = torch_engine(torch.nn.parallel.DistributedDataParallel(model), trainable, lr)
    else:
        import deepspeed

        from trainers.config import TrainConfig
        from trainers.deepspeed_config import deepspeed_config
        from trainers.deepspeed_ops import use_own_op_builds

        use_own_op_builds()  # as zeray's training loop does
        train = TrainConfig(zero_stage=int(kind[-1]), micro_batch_size=1, grad_clip=1.0, lr=lr)
        config = deepspeed_config(train, 2, "fp32", model.config.hidden_size)
        ds, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=config)
        engine = (ds, ds.backward, ds.step)
    tokens, started, times = 0, 0.0, [0.0] * 3
    for step in range(steps):
        if step == WARMUP:
            dist.barrier()
            tokens, started, times = 0, time.perf_counter(), [0.0] * 3
        tokens += timed_step(engine, [rows[(2 * step + rank) % len(rows)]], times)
    total = torch.tensor([tokens], dtype=torch.float64)
    dist.all_reduce(total)
    if rank == 0:
        out.put((float(total) / (time.perf_counter() - started), [t / (steps - WARMUP) for t in times]))
    dist.destroy_process_group()


def data_parallel(rows: list[dict], model_dir: str, kind: str, steps: int, lora: bool, lr: float):
    """(tokens/s, [forward, backward, optimizer step] seconds per step) of 2 `kind` processes."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.get_context("spawn").SimpleQueue()
    mp.spawn(data_parallel_worker, args=(rows, model_dir, kind, steps, lora, lr, port, out), nprocs=2)
    return out.get()


RUNS = {
    "plain": "plain PyTorch loop, 1 process",
    "ddp": "torch DDP, 2 processes (gloo)",
    "ds0": "DeepSpeed ZeRO 0 alone, 2 processes",
    "ds2": "DeepSpeed ZeRO 2 alone, 2 processes",
    0: "zeray train, 2 workers, ZeRO 0",
    2: "zeray train, 2 workers, ZeRO 2",
}


def model_throughput(root: str, data: str, model_dir: str, steps: int) -> tuple[dict, dict]:
    """({lora: {run: tokens/s}}, {run: forward/backward/step seconds}) on a real model: each RUNS entry, full
    fine-tune and LoRA, on the same rows."""
    rows = training_rows(data, model_dir)
    speed, phases = {}, {}
    for lora in (False, True):
        lr = 2e-4 if lora else 1e-5  # a pretrained model's usual rates
        speed[lora] = {"plain": plain_tokens_per_s(rows, model_dir, steps, lora, lr)}
        for kind in ("ddp", "ds0", "ds2"):
            speed[lora][kind], split = data_parallel(rows, model_dir, kind, steps, lora, lr)
            if not lora:
                phases[kind] = split
        for stage in (0, 2):
            speed[lora][stage] = zeray_tokens_per_s(root, data, model_dir, steps, stage, lora, lr)
    return speed, phases


def tensor_bytes() -> int:
    """Bytes of every distinct tensor storage alive in this process."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # isinstance() on torch's deprecated aliases
    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and obj.untyped_storage().nbytes():
                ptr = obj.untyped_storage().data_ptr()
                if ptr not in seen:
                    seen.add(ptr)
                    total += obj.untyped_storage().nbytes()
        except (RuntimeError, ReferenceError):
            continue
    return total


def memory_worker(config: dict) -> dict:
    import deepspeed
    from transformers import AutoModelForCausalLM

    from trainers.config import TrainConfig
    from trainers.deepspeed_config import deepspeed_config
    from trainers.deepspeed_fixes import share_fp32_master_partitions
    from trainers.deepspeed_ops import use_own_op_builds

    share_fp32_master_partitions()  # as zeray's training loop does
    use_own_op_builds()
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(config["model"], dtype=torch.float32)
    train = TrainConfig(zero_stage=config["stage"], micro_batch_size=1, grad_clip=0.0)
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=list(model.parameters()),
        config=deepspeed_config(train, 2, config["dtype"], model.config.hidden_size),
    )
    ids = torch.randint(0, model.config.vocab_size, (1, 64))
    engine.backward(engine(input_ids=ids, labels=ids, use_cache=False).loss)
    engine.step()  # AdamW's moments exist from here on
    engine.backward(engine(input_ids=ids, labels=ids, use_cache=False).loss)  # and the gradients, until the step
    del ids
    gc.collect()
    held = tensor_bytes()
    engine.step()
    return {"bytes": held}  # Ray Train hands rank 0's return value to the driver


def zero_memory(model_dir: str, dtype: str) -> dict[int, int]:
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    out = {}
    for stage in (0, 1, 2, 3):
        trainer = TorchTrainer(
            memory_worker,
            train_loop_config={"model": model_dir, "stage": stage, "dtype": dtype},
            scaling_config=ScalingConfig(num_workers=2),
        )
        out[stage] = trainer.fit().return_value["bytes"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, help="training steps of each throughput run (default 40; 15 with --model)")
    parser.add_argument(
        "--parts", help="which measurements, comma-separated (default: all three; throughput with --model)"
    )
    parser.add_argument(
        "--model",
        help="measure throughput on this Hugging Face model folder (artifacts/smollm2 after ./run.sh demo): zeray "
        "full and LoRA at ZeRO 0 and 2 against the plain loop, torch DDP and DeepSpeed alone",
    )
    args = parser.parse_args()
    steps = args.steps or (15 if args.model else 40)
    parts = set((args.parts or ("throughput" if args.model else "throughput,eval,memory")).split(","))
    if not parts <= {"throughput", "eval", "memory"}:
        parser.error(f"--parts: give throughput, eval and/or memory, not {args.parts}")

    from cluster.local import init_embedded
    from pipelines.corpus import write_demo_data
    from trainers.plan import model_shape, model_states_bytes
    from trainers.tiny_model import build_model

    with tempfile.TemporaryDirectory() as root:
        data, model, small = (os.path.join(root, name) for name in ("chat.jsonl", "model", "small"))
        write_demo_data(data)
        if "throughput" in parts and not args.model:
            build_model(data, model, size="demo")
        if parts & {"eval", "memory"}:
            build_model(data, small, size="small")
        init_embedded(4, "127.0.0.1")  # as `zeray train` starts its own Ray
        try:
            ray.data.DataContext.get_current().enable_progress_bars = False
            if "throughput" in parts and args.model:
                real = model_throughput(root, data, args.model, steps)
            elif "throughput" in parts:
                zeray = zeray_tokens_per_s(root, data, model, steps)
                plain = plain_tokens_per_s(training_rows(data, model), model, steps)
            if "eval" in parts:
                evals = {workers: eval_seconds(root, data, small, workers) for workers in (1, 2)}
            if "memory" in parts:
                measured = {dtype: zero_memory(small, dtype) for dtype in ("fp32", "bf16")}
        finally:
            ray.shutdown()
        shape = model_shape(model, False) if "throughput" in parts and not args.model else None
        small_shape = model_shape(small, False) if parts & {"eval", "memory"} else None

    if "throughput" in parts and args.model:
        (speed, phases), params = real, model_shape(args.model, False)["params"]
        print(f"throughput (real tokens/s), {args.model} {params / 1e6:.1f}M, packed 512-token rows, fp32")
        print(f"  {'':36} {'full':>7} {'LoRA':>7}")
        for key, label in RUNS.items():
            print(f"  {label:36} {speed[False][key]:7.0f} {speed[True][key]:7.0f}")
        print("where a full fine-tune's step goes (seconds: forward + loss, backward, optimizer step)")
        for kind, split in phases.items():
            print(f"  {RUNS[kind]:36} " + "  ".join(f"{t:5.2f}" for t in split) + f"  = {sum(split):5.2f}")
        for stage, goal in ((0, 0.95), (2, 0.9)):
            ratios = "  ".join(f"{speed[lora][stage] / speed[lora]['ddp']:.2f}" for lora in (False, True))
            alone = "  ".join(f"{speed[lora][stage] / speed[lora][f'ds{stage}']:.2f}" for lora in (False, True))
            print(f"zeray ZeRO {stage} / DDP (full, LoRA) = {ratios}  (goal >= {goal}); / DeepSpeed alone = {alone}")
        ratios = "  ".join(f"{speed[lora][2] / speed[lora]['plain']:.2f}" for lora in (False, True))
        print(f"zeray ZeRO 2 / plain loop (full, LoRA) = {ratios}")
    elif "throughput" in parts:
        print(f"throughput (real tokens/s), demo model {shape['params'] / 1e6:.1f}M, packed 512-token rows")
        print(f"  zeray train, 2 workers, ZeRO 2   {zeray:10.0f}")
        print(f"  plain PyTorch loop, 1 process    {plain:10.0f}")
        print(f"zeray / plain = {zeray / plain:.2f}  (target >= 0.85)")
    if "eval" in parts:
        print(f"evaluation during training, small model {small_shape['params'] / 1e6:.1f}M, validation split 30%")
        for workers, (seconds, loss) in evals.items():
            print(f"  {workers} worker(s): {seconds:6.2f} s per pass, first validation loss {loss:.6f}")
        print(f"2 workers / 1 worker = {evals[2][0] / evals[1][0]:.2f}  (target <= 0.6)")
    for dtype, stages in (measured if "memory" in parts else {}).items():
        print(f"model-state memory per worker, small model {small_shape['params'] / 1e6:.1f}M (2 workers, {dtype})")
        for stage, got in stages.items():
            estimate = model_states_bytes(
                small_shape["params"], small_shape["largest_layer_params"], stage, "none", 2, mixed=dtype != "fp32"
            )[0]
            print(
                f"  ZeRO {stage}: {got / 2**20:8.1f} MiB   vs stage 0 {got / stages[0]:.2f}   "
                f"vs estimate {estimate / 2**20:7.1f} MiB = {got / estimate:.2f}"
            )
        print(f"{dtype}: ZeRO 3 / ZeRO 0 = {stages[3] / stages[0]:.2f}  (target <= 0.60)")


if __name__ == "__main__":
    main()
