"""What a run leaves beside Ray Train's own folder: config.json, metrics.jsonl, summary.json, report.png, model/."""

import json
import os

from ray.train.v2.api.callback import UserCallback

from cluster.console import worker_line
from core.fs import exists, read_bytes, resolve

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.png"
MODEL_DIR = "model"
RUN_CONFIG = "config.json"  # the run's settings, checked when it resumes


class MetricsLog(UserCallback):
    """Appends rank 0's metrics of every `ray.train.report` to the run's metrics.jsonl (runs in the Train
    controller, on the driver's node); an object store's copy is replaced after each report."""

    def __init__(self, store):
        self.store = store
        self.path = os.path.join(store.local, METRICS_FILE)

    def after_report(self, run_context, metrics, checkpoint):
        row = dict(metrics[0])
        row.pop("final", None)
        if checkpoint is not None:
            row["checkpoint"] = checkpoint.path
            worker_line(f"checkpoint step {row.get('step')}: {self.store.location(checkpoint.path)}")
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        self.store.push(METRICS_FILE)


def read_metrics(run_dir: str) -> list[dict]:
    """Every row of a run's metrics.jsonl; `run_dir` is a local path or a URI."""
    fs, path = resolve(run_dir, "storage")
    if not exists(fs, f"{path}/{METRICS_FILE}"):
        return []
    return [json.loads(line) for line in read_bytes(fs, f"{path}/{METRICS_FILE}").decode().splitlines() if line.strip()]


def write_summary(run_dir: str, summary: dict) -> str:
    path = os.path.join(run_dir, SUMMARY_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
    return path


def plot_report(run_dir: str, rows: list[dict]) -> str:
    """Training and validation loss (and the learning rate) against the optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    # the base model's evaluation is the curve's step 0
    evals = [
        (r["step"], r.get("eval_loss", r.get("base_eval_loss")))
        for r in rows
        if "eval_loss" in r or "base_eval_loss" in r
    ]
    lrs = [(r["step"], r["lr"]) for r in rows if "lr" in r]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", color="tab:orange")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    if lrs:
        ax2 = ax.twinx()
        ax2.plot(*zip(*lrs), "--", color="tab:gray", alpha=0.6, label="lr")
        ax2.set_ylabel("learning rate")
        ax2.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
        ax.legend(lines, [ln.get_label() for ln in lines], loc="upper right")
    else:
        ax.legend(loc="upper right")
    ax.set_title(os.path.basename(os.path.normpath(run_dir)))
    fig.tight_layout()
    path = os.path.join(run_dir, REPORT_FILE)
    fig.savefig(path)
    plt.close(fig)
    return path
