"""Throughput and memory on NVIDIA GPUs: `zeray train` of a ~0.5B model at ZeRO-2 and ZeRO-3, in one command.

    .venv/bin/python bench/gpu.py [--steps 50] [--seq 2048]

A Llama-architecture model of ~0.5B parameters built from a config (hidden 1024, 24 layers, vocabulary 32,000; no
download; the demo tokenizer uses the first ids), the demo conversations repeated and packed into `--seq`-token rows,
bf16, gradient checkpointing, the chunked loss, one worker per GPU of this machine, for ZeRO-2 and ZeRO-3. Prints per
stage: tokens/s per GPU (steady windows), MFU (against the GPU's bf16 peak), peak memory per GPU, and whether the
loss went down and the exported model loads. Not part of the test suite; on a machine without CUDA it exits 2.
"""

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build(data: str, out: str) -> int:
    """The ~0.5B model: the demo tokenizer (its ids are the first of the 32,000), random weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainers.tiny_model import texts_from_jsonl, train_tokenizer

    tokenizer = train_tokenizer(texts_from_jsonl(data), 4096)
    config = LlamaConfig(
        vocab_size=32_000,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def repeated_data(source: str, out: str, times: int) -> None:
    """The demo conversations `times` over, each copy told apart (dedup would drop exact repeats)."""
    with open(source, encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    with open(out, "w", encoding="utf-8") as f:
        for copy in range(times):
            for record in records:
                first = dict(record["messages"][0])
                first["content"] = f"[{copy}] {first['content']}"
                f.write(json.dumps({"messages": [first, *record["messages"][1:]]}) + "\n")


def run(root: str, data: str, model: str, gpus: int, stage: int, steps: int, seq: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from zeray.cli import main

    name = f"zero{stage}"
    config = os.path.join(root, f"{name}.yaml")
    with open(config, "w") as f:
        json.dump(
            {
                "name": name,
                "storage": os.path.join(root, "runs"),
                "data": {"train": data, "format": "messages", "max_length": seq},
                "model": {"name_or_path": model, "dtype": "bf16"},
                "train": {
                    "num_workers": gpus,
                    "use_gpu": True,
                    "max_steps": steps,
                    "epochs": 1000,  # max_steps decides, however few rows the GPUs share
                    "micro_batch_size": 4,
                    "lr": 3e-4,
                    "zero_stage": stage,
                    "gradient_checkpointing": True,
                    "eval_every": 10_000,
                    "checkpoint_every": 10_000,
                    "log_every": 5,
                },
            },
            f,
        )
    code = main(["train", config])
    if code != 0:
        raise SystemExit(f"bench/gpu.py: zeray train at ZeRO-{stage} exited {code}")
    run_dir = os.path.join(root, "runs", name)
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    loaded = AutoModelForCausalLM.from_pretrained(os.path.join(run_dir, "model"), dtype=torch.bfloat16)
    return {
        "tokens_per_s_per_gpu": summary["tokens_per_s"] / gpus,
        "mfu": summary["mfu"],
        "peak_memory_gb": summary["peak_memory_gb"],
        "loss_down": summary["final_loss"] < summary["first_loss"],
        "first_loss": summary["first_loss"],
        "final_loss": summary["final_loss"],
        "export_loads": sum(p.numel() for p in loaded.parameters()) > 0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seq", type=int, default=2048)
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print(
            "error: bench/gpu.py needs NVIDIA GPUs with CUDA (torch.cuda.is_available() is False here)", file=sys.stderr
        )
        sys.exit(2)
    gpus = torch.cuda.device_count()
    name = torch.cuda.get_device_name(0)

    import ray

    from pipelines.corpus import write_demo_data

    with tempfile.TemporaryDirectory() as root:
        demo, data, model = (os.path.join(root, n) for n in ("demo.jsonl", "chat.jsonl", "model"))
        write_demo_data(demo)
        repeated_data(demo, data, times=20)  # ~400 packed 2048-token rows: epochs repeat them as needed
        params = build(demo, model)
        ray.init(include_dashboard=True, dashboard_host="127.0.0.1", logging_level="ERROR")
        try:
            results = {stage: run(root, data, model, gpus, stage, args.steps, args.seq) for stage in (2, 3)}
        finally:
            ray.shutdown()

    print(
        f"{params / 1e6:.0f}M-parameter Llama, {gpus} x {name}, bf16, gradient checkpointing, packed {args.seq}-token "
        f"rows, micro-batch 4, {args.steps} steps"
    )
    print(f"  {'':7} {'tokens/s/GPU':>13} {'MFU':>6} {'peak GB/GPU':>12} {'loss':>17} {'export':>7}")
    for stage, r in results.items():
        mfu = f"{r['mfu']:.2f}" if r["mfu"] is not None else "?"
        loss = f"{r['first_loss']:.2f} -> {r['final_loss']:.2f}"
        print(
            f"  ZeRO-{stage} {r['tokens_per_s_per_gpu']:13.0f} {mfu:>6} {r['peak_memory_gb']:12.2f} {loss:>17} "
            f"{'loads' if r['export_loads'] else 'FAILED':>7}"
        )
    if not all(r["loss_down"] and r["export_loads"] for r in results.values()):
        print("error: the loss did not go down or the export did not load (see above)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
