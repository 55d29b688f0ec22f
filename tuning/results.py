"""What a finished campaign leaves in `<storage>/<name>/tune/`: results.csv, best.json, tune.png and best_model/,
with every trial pruned to its best checkpoint.

Everything is read from the trials' own run folders (metrics.jsonl of each training run), so the files describe
exactly the checkpoints and evaluations that exist on disk.
"""

import csv
import json
import os
import re
import tempfile

import pyarrow.fs as pafs

from core.console import say
from core.errors import UserError, find_user_error, first_line
from core.fs import display, entries, exists, files, join, kind, resolve, upload, write_bytes
from core.keys import flatten
from trainers.checkpoints import export
from trainers.outputs import SUMMARY_FILE, read_metrics
from tuning.trial import FIRST_RUN

RESULTS_FILE = "results.csv"
BEST_FILE = "best.json"
PLOT_FILE = "tune.png"
BEST_MODEL = "best_model"


def write_results(cfg, out: str, grid) -> dict:
    """`out`: the campaign folder, a local path or a URI (the files are written here, then copied there)."""
    t = cfg.tune
    better = min if t.mode == "min" else max
    fs, out_path = resolve(out, "storage")
    trials = sorted((describe(result, t.metric, better, fs) for result in grid), key=lambda x: x["trial"])
    for trial in trials:
        prune(trial, fs)
    keys = list(cfg.tune.space)
    with tempfile.TemporaryDirectory(prefix="zeray-tune-") as staging:
        with open(os.path.join(staging, RESULTS_FILE), "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["trial", "status", *keys, t.metric, "step", "steps_trained", "checkpoint", "reason"])
            for x in trials:
                writer.writerow(
                    [
                        x["trial"],
                        x["status"],
                        *(x["params"].get(k) for k in keys),
                        x["value"],
                        x["step"],
                        x["steps_trained"],
                        x["checkpoint"] or "",
                        x["reason"],
                    ]
                )
        plot(trials, t.metric, os.path.join(staging, PLOT_FILE))
        for name in (RESULTS_FILE, PLOT_FILE):
            upload(os.path.join(staging, name), fs, f"{out_path}/{name}")
    print_table(trials, t.metric, t.mode, keys)

    with_model = [x for x in trials if x["checkpoint"]]
    if not with_model:
        raise UserError(
            f"no trial of campaign {cfg.name} reached a checkpoint; the reasons are in {join(out, RESULTS_FILE)}"
        )
    best = better(with_model, key=lambda x: x["checkpoint_value"])
    model_dir = join(out, BEST_MODEL)
    export(best["run_dir"], model_dir, checkpoint=best["checkpoint"])
    counts = {status: sum(x["status"] == status for x in trials) for status in ("completed", "stopped", "failed")}
    summary = {
        "metric": t.metric,
        "mode": t.mode,
        "value": best["checkpoint_value"],
        # the model before any trial trained it (evaluated once, by one trial, when all trials share the data)
        "base_eval_loss": best["base_eval_loss"]
        if best["base_eval_loss"] is not None
        else next((x["base_eval_loss"] for x in trials if x["base_eval_loss"] is not None), None),
        "trial": best["trial"],
        "step": best["checkpoint_step"],
        "config": best["params"],
        "checkpoint": best["checkpoint"],
        "model_dir": model_dir,
        "trials": counts,
        "steps_trained": sum(x["steps_trained"] for x in trials),
        "disk_bytes": disk_usage(fs, out_path),
    }
    write_bytes(fs, f"{out_path}/{BEST_FILE}", json.dumps(summary, indent=2).encode())
    say(
        f"best: trial {best['trial']} {t.metric} {best['checkpoint_value']:.4f} at step {best['checkpoint_step']} "
        + (f"(base model eval_loss {summary['base_eval_loss']:.4f}) " if summary["base_eval_loss"] is not None else "")
        + f"({_params(best['params'])}); model in {model_dir}; campaign uses "
        f"{summary['disk_bytes'] / 2**20:.1f} MiB in {out}",
    )
    return summary


def describe(result, metric: str, better, fs: pafs.FileSystem) -> dict:
    """One trial from its Tune result and its training runs' metrics (`fs`: the campaign's filesystem)."""
    trial_dir = result.path  # in fs
    runs = sorted(
        (
            i.base_name
            for i in entries(fs, trial_dir)
            if i.type == pafs.FileType.Directory and re.fullmatch(rf"{FIRST_RUN}(-\d+)?", i.base_name)
        ),
        key=lambda d: int(d.rpartition("-")[2]) if "-" in d else 1,
    )
    evals, checkpoints, steps_trained, base = [], [], 0, None
    for run in runs:
        rows = read_metrics(display(fs, f"{trial_dir}/{run}"))
        start = next((r["step"] for r in rows if "started_from" in r), 0)
        steps_trained += max((r["step"] for r in rows), default=start) - start
        evals += [r for r in rows if metric in r]
        base = base or next((r for r in rows if "base_eval_loss" in r), None)
        # (a row's checkpoint is its path in fs)
        checkpoints += [
            (r, display(fs, f"{trial_dir}/{run}"))
            for r in rows
            if metric in r and r.get("checkpoint") and kind(fs, r["checkpoint"]) == pafs.FileType.Directory
        ]
    best_eval = better(evals, key=lambda r: r[metric]) if evals else None
    best_ckpt, run_dir = better(checkpoints, key=lambda c: c[0][metric]) if checkpoints else (None, None)
    if result.error is not None:
        status = "failed"
    elif runs and exists(fs, f"{trial_dir}/{runs[-1]}/{SUMMARY_FILE}"):
        status = "completed"
    else:
        status = "stopped"  # by the scheduler, before the end of its training
    return {
        "trial": _trial_id(result),
        "status": status,
        "params": flatten(result.config or {}),
        "dir": trial_dir,
        "value": best_eval[metric] if best_eval else None,
        "step": best_eval["step"] if best_eval else None,
        "checkpoint": display(fs, best_ckpt["checkpoint"]) if best_ckpt else None,
        "run_dir": run_dir,
        "checkpoint_path": best_ckpt["checkpoint"] if best_ckpt else None,
        "checkpoint_value": best_ckpt[metric] if best_ckpt else None,
        "checkpoint_step": best_ckpt["step"] if best_ckpt else None,
        "steps_trained": steps_trained,
        "reason": _reason(result.error),
        "curve": [(r["step"], r[metric]) for r in evals],
        "base_eval_loss": base["base_eval_loss"] if base else None,
    }


def prune(trial: dict, fs: pafs.FileSystem) -> None:
    """Keep the trial's best checkpoint only: other Ray Train checkpoints of its runs, and the copies Tune kept for
    PBT to clone, are no longer needed once the campaign is over. (Folders are found from the files under them:
    an object store has no folders of its own.)"""
    doomed = set()
    for rel in files(fs, trial["dir"]):
        parts = rel.split("/")
        for depth, part in enumerate(parts[:-1]):
            if part.startswith("checkpoint_") or re.fullmatch(r"start-\d+", part):
                doomed.add("/".join([trial["dir"], *parts[: depth + 1]]))
                break
    for path in sorted(doomed - {trial["checkpoint_path"]}):
        fs.delete_dir(path)


def plot(trials: list[dict], metric: str, path: str) -> None:
    """The metric of every trial against the optimizer step; a cross marks where the scheduler stopped a trial."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for x in trials:
        if not x["curve"]:
            continue
        steps, values = zip(*x["curve"])
        (line,) = ax.plot(steps, values, "-", marker=".", alpha=0.85, label=f"{x['trial']} {_params(x['params'])}")
        if x["status"] != "completed":
            ax.plot(steps[-1], values[-1], "x", color=line.get_color(), markersize=10, markeredgewidth=2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per trial (x: stopped early or failed)")
    ax.grid(alpha=0.3)
    if len(trials) <= 12:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def print_table(trials: list[dict], metric: str, mode: str, keys: list[str], top: int = 5) -> None:
    ranked = sorted((x for x in trials if x["value"] is not None), key=lambda x: x["value"], reverse=mode == "max")[
        :top
    ]
    say(f"\ntop {len(ranked)} of {len(trials)} trials by {metric}:")
    say(f"  {'trial':<14}{'status':<11}{metric:>12}{'step':>7}  " + "  ".join(keys))
    for x in ranked:
        say(
            f"  {x['trial']:<14}{x['status']:<11}{x['value']:>12.4f}{x['step']:>7}  "
            + "  ".join(_fmt(x["params"].get(k)) for k in keys)
        )
    for x in trials:
        if x["status"] == "failed":
            say(f"  {x['trial']} failed: {x['reason']}")


def disk_usage(fs: pafs.FileSystem, path: str) -> int:
    return sum(files(fs, path).values())


def _trial_id(result) -> str:
    # Tune names trial folders run_trial_<id>_<index>_<params>_<date>, the id being 5 hex + 5 digits
    # (its own sampling) or 8 hex (a search algorithm's)
    found = re.match(r"run_trial_([0-9a-f]+(?:_\d{5})?)_\d+_", os.path.basename(result.path))
    return found.group(1) if found else os.path.basename(result.path)


def _reason(error) -> str:
    if error is None:
        return ""
    found = find_user_error(error)
    if found is not None:
        return first_line(found)
    return (str(error).strip().splitlines() or [type(error).__name__])[-1]  # a traceback's last line names it


def _params(params: dict) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in params.items())


def _fmt(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
