"""Peak memory per worker with gradient checkpointing and the chunked loss, against `zeray plan`, in one run.

    .venv/bin/python bench/memory.py [--seq 2048] [--vocab 32000 | --model artifacts/smollm2] [--dtype bf16]

A Llama-architecture model of 134M parameters built from a config (hidden 768, 12 layers, vocabulary 32,000, or
--vocab's, as Llama 3's 128,256; no download; the demo tokenizer uses the first ids), or with --model a real model
folder and its tokenizer, the demo conversations packed into 2048-token rows, `zeray train` with 2 workers, ZeRO-3,
fp32 (or --dtype's), on CPU, two optimizer steps of one row per worker (the second step's forward and backward hold
AdamW's states, which it allocates in its first step: a real run's steps all do), for (a) plain, (b) gradient
checkpointing, (c) the chunked loss, (d) both. Measured: each run's `peak_memory_gb`, the fullest worker's resident
high-water mark from its first step on (not the model's loading), with glibc returning every freed buffer of 64 KiB
or more to the system (MALLOC_MMAP_THRESHOLD_), so resident memory follows live tensors rather than what the
allocator keeps; and its activations: that peak minus the peak of the same run on 64-token rows (the model states,
the optimizer's and the runtime's memory, which do not grow with the sequence). Printed against `zeray plan`'s
activation estimate, and each peak against the plan's total (model states, activations and a CPU worker's runtime,
trainers.plan.CPU_RUNTIME).
"""

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ray  # noqa: E402
import yaml  # noqa: E402

SETTINGS = {  # name: (gradient_checkpointing, chunked_loss)
    "plain": (False, False),
    "checkpointing": (True, False),
    "chunked loss": (False, True),
    "both": (True, True),
}
GB = 1024**3


def build(data: str, out: str, vocab: int) -> int:
    """The 134M-parameter model (at 32,000 ids): the demo tokenizer (its ids are the first), random weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainers.tiny_model import texts_from_jsonl, train_tokenizer

    tokenizer = train_tokenizer(texts_from_jsonl(data), 4096)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=12,
        max_position_embeddings=2048,
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


def run(root: str, data: str, model: str, name: str, seq: int, dtype: str, checkpointing: bool, chunked: bool) -> dict:
    """Two steps of `zeray train`: the worker's peak memory, and the plan's estimate for the same config."""
    from trainers.plan import make_memory_plan
    from zeray.cli import main
    from zeray.config import load_config

    config = os.path.join(root, f"{name}.yaml")
    with open(config, "w") as f:
        yaml.safe_dump(
            {
                "name": name,
                "storage": os.path.join(root, "runs"),
                # most records to training: evaluation at the end is not what is measured
                "data": {"train": data, "format": "messages", "max_length": seq, "split": {"val": 0.02, "test": 0.02}},
                "model": {"name_or_path": model, "dtype": dtype},
                "train": {
                    "num_workers": 2,
                    "max_steps": 2,
                    "micro_batch_size": 1,
                    "zero_stage": 3,
                    "gradient_checkpointing": checkpointing,
                    "chunked_loss": chunked,
                    "log_every": 1,
                },
            },
            f,
        )
    assert main(["train", config]) == 0, name
    with open(os.path.join(root, "runs", name, "summary.json")) as f:
        summary = json.load(f)
    plan = make_memory_plan(load_config(config, []), use_gpu=False)["chosen"]
    return {
        "peak": summary["peak_memory_gb"] * GB,
        "plan_act": plan["activations_gb"] * GB,
        "plan_states": plan["model_states_gb"] * GB,
        "plan_total": plan["total_gb"] * GB,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32_000, help="the built model's vocabulary")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="training precision")
    parser.add_argument(
        "--model",
        help="a Hugging Face model folder to measure instead of the 134M Llama built from a config "
        "(artifacts/smollm2 after ./run.sh demo: vocabulary 49,152, tied embeddings)",
    )
    args = parser.parse_args()

    from pipelines.corpus import write_demo_data

    with tempfile.TemporaryDirectory() as root:
        data, model = os.path.join(root, "chat.jsonl"), os.path.join(root, "model")
        write_demo_data(data)
        if args.model:
            from transformers import AutoConfig

            from trainers.plan import model_shape

            model, params = os.path.abspath(args.model), model_shape(args.model, False)["params"]
            described = (
                f"{args.model} ({params / 1e6:.0f}M, vocabulary {AutoConfig.from_pretrained(model).vocab_size:,})"
            )
        else:
            params = build(data, model, args.vocab)
            described = f"{params / 1e6:.0f}M-parameter Llama, vocabulary {args.vocab:,}"
        ray.init(
            num_cpus=4,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            logging_level="ERROR",
            runtime_env={"env_vars": {"MALLOC_MMAP_THRESHOLD_": "65536"}},
        )
        try:
            ray.data.DataContext.get_current().enable_progress_bars = False
            base = run(root, data, model, "base", 64, args.dtype, False, False)
            got = {
                name: run(root, data, model, name.replace(" ", "-"), args.seq, args.dtype, *flags)
                for name, flags in SETTINGS.items()
            }
        finally:
            ray.shutdown()

    print(f"peak memory per worker: {described}, {args.seq}-token rows, 2 workers, ZeRO-3, {args.dtype}, CPU")
    print(
        f"  64-token run (states + runtime): {base['peak'] / GB:.2f} GB; plan's total {base['plan_total'] / GB:.2f} "
        f"GB (model states {base['plan_states'] / GB:.2f}), plan / peak {base['plan_total'] / base['peak']:.2f}"
    )
    print(
        f"  {'':14} {'peak GB':>8} {'activ. GB':>10} {'plan activ.':>12} {'plan/meas.':>11}"
        f" {'plan total':>11} {'plan/peak':>10}"
    )
    for name, r in got.items():
        act = r["peak"] - base["peak"]
        r["act"] = act
        print(
            f"  {name:14} {r['peak'] / GB:8.2f} {act / GB:10.2f} {r['plan_act'] / GB:12.2f} {r['plan_act'] / act:11.2f}"
            f" {r['plan_total'] / GB:11.2f} {r['plan_total'] / r['peak']:10.2f}"
        )
    worst = max(abs(r["plan_total"] / r["peak"] - 1) for r in [base, *got.values()])
    print(f"plan's total against every measured peak: within {worst:.0%}  (target 25%)")
    plain = got["plain"]
    print(f"activations, checkpointing / plain = {got['checkpointing']['act'] / plain['act']:.2f}  (target <= 0.40)")
    print(f"activations, both / plain = {got['both']['act'] / plain['act']:.2f}")
    print(f"peak, chunked loss / plain = {got['chunked loss']['peak'] / plain['peak']:.2f}  (target <= 0.70)")
    print(f"activations, chunked loss / plain = {got['chunked loss']['act'] / plain['act']:.2f}")
    print(f"peak, both / checkpointing = {got['both']['peak'] / got['checkpointing']['peak']:.2f}")


if __name__ == "__main__":
    main()
