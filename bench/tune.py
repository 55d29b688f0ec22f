"""ASHA against FIFO on the same space and budget, as ratios measured in one run.

    .venv/bin/python bench/tune.py [--trials 16] [--steps 60] [--reduction-factor 3]

Both campaigns run the same `--trials` learning rates (log-spaced, in a seeded shuffled order, so neither scheduler
sees the good ones first by construction) on the same data and model (the demo data, the 0.2M-parameter test model,
one worker per trial, two trials at once), each for up to `--steps` optimizer steps, evaluated every 5.
Prints, for each: compute used (optimizer steps trained, summed over trials), the best validation loss of a kept
checkpoint, and wall time; then ASHA's compute as a fraction of FIFO's and how far ASHA's best is from FIFO's.
"""

import argparse
import json
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import yaml  # noqa: E402


def campaign(root: str, data: str, model: str, scheduler: str, lrs: list[float], steps: int, rf: int) -> dict:
    from zeray.cli import main

    config = os.path.join(root, f"{scheduler}.yaml")
    with open(config, "w") as f:
        yaml.safe_dump(
            {
                "name": scheduler,
                "storage": os.path.join(root, "runs"),
                "data": {"train": data, "format": "messages", "max_length": 128},
                "model": {"name_or_path": model},
                "train": {
                    "num_workers": 1,
                    "max_steps": steps,
                    "micro_batch_size": 8,
                    "zero_stage": 2,
                    "warmup_ratio": 0.0,
                    "eval_every": 5,
                    "checkpoint_every": steps,
                    "log_every": 5,
                },
                "tune": {
                    "search": "grid",
                    "scheduler": scheduler,
                    "grace_period": 5,
                    "reduction_factor": rf,
                    "space": {"train.lr": {"grid": lrs}},
                },
            },
            f,
        )
    started = time.perf_counter()
    assert main(["tune", config]) == 0
    with open(os.path.join(root, "runs", scheduler, "tune", "best.json")) as f:
        best = json.load(f)
    return {
        "steps": best["steps_trained"],
        "best": best["value"],
        "lr": best["config"]["train.lr"],
        "wall_s": time.perf_counter() - started,
        "trials": best["trials"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--reduction-factor", type=int, default=3, help="ASHA's: 1/rf of the trials go on at each rung")
    args = parser.parse_args()

    import ray

    from pipelines.corpus import write_demo_data
    from trainers.tiny_model import build_model

    root = tempfile.mkdtemp(prefix="zeray-bench-tune-")
    data, model = os.path.join(root, "chat.jsonl"), os.path.join(root, "tiny")
    write_demo_data(data)
    build_model(data, model, size="tiny", seed=0)
    lrs = [float(f"{1e-4 * 100 ** (i / (args.trials - 1)):.3g}") for i in range(args.trials)]
    random.Random(0).shuffle(lrs)
    # one Ray for both campaigns, sized as `zeray tune` sizes its own on 2 cores: 2 trial slots + 2 for Ray Data
    ray.init(num_cpus=4, dashboard_host="127.0.0.1", logging_level="WARNING", configure_logging=True)
    try:
        fifo = campaign(root, data, model, "fifo", lrs, args.steps, args.reduction_factor)
        asha = campaign(root, data, model, "asha", lrs, args.steps, args.reduction_factor)
    finally:
        ray.shutdown()
    print(
        f"\n{args.trials} trials, learning rates {lrs}, up to {args.steps} steps each, "
        f"ASHA reduction factor {args.reduction_factor}"
    )
    for name, r in (("fifo", fifo), ("asha", asha)):
        print(
            f"{name}: {r['steps']} trial-steps, best eval_loss {r['best']:.4f} (lr {r['lr']:g}), "
            f"{r['wall_s']:.0f}s wall, trials {r['trials']}"
        )
    print(f"compute: asha / fifo = {asha['steps'] / fifo['steps']:.2f} (target <= 0.5)")
    print(f"best: asha vs fifo = {(asha['best'] - fifo['best']) / fifo['best']:+.2%} (target within 2%)")
    print(f"wall: asha / fifo = {asha['wall_s'] / fifo['wall_s']:.2f}")


if __name__ == "__main__":
    main()
