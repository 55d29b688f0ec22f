"""`zeray train` on the driver: build the streamed datasets, size the run, fit a TorchTrainer, write the outputs.

Needs a connected Ray (see cluster.local.ray_session); everything heavy runs in Ray Data tasks and Train workers.
"""

import json
import os
import time

from ray.data import ExecutionOptions
from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, ScalingConfig
from ray.train import RunConfig as TrainRunConfig
from ray.train.torch import TorchTrainer

from cluster.local import fit_or_explain, placement_timeout
from cluster.resources import worker_resources
from cluster.storage import run_store
from core.console import say
from core.errors import UserError
from core.fs import exists, read_bytes, resolve
from pipelines.dataset import build_splits, count_records, load_tokenizer, without_progress_bars
from pipelines.prep import load_prepared, source_lines, summary_line
from trainers.checkpoints import CheckpointScore, damage, export
from trainers.deepspeed_config import deepspeed_config, load_user_deepspeed
from trainers.loop import train_loop_per_worker
from trainers.outputs import (
    MODEL_DIR,
    REPORT_FILE,
    RUN_CONFIG,
    SUMMARY_FILE,
    MetricsLog,
    plot_report,
    read_metrics,
    write_summary,
)
from trainers.plan import explain, make_memory_plan
from trainers.steps import WorkerPlan, make_plan
from trainers.tracking import Tracking

# How often Ray Train's controller polls the workers (Ray's default: 2 s). A worker's next ray.train.report waits
# until the controller has taken its previous one (the worker's result queue holds one), so at the default a run
# that reports more often than every 2 s is held to one report per 2 s (on this machine's tiny demo model: 740 real
# tokens/s against 14,500 at 0.1 s). Ray passes the variable on to the controller; a user's own value is kept.
REPORT_POLL_S = "0.1"


# keys a resumed run may change: they do not alter what the checkpoints mean or where the data stream stands
RESUMABLE_CHANGES = {
    "train.max_failures",
    "train.log_every",
    "train.eval_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.epochs",
    "train.max_steps",
    "train.cpus_per_worker",
    "train.tensorboard",
    "train.mlflow_uri",
    "train.mlflow_experiment",
    "train.wandb_project",
    "train.wandb_entity",
    "train.wandb_run_name",
    "train.eval_base",
    "train.elastic_resize_s",
}


def check_same_run(cfg, path: str, sections: tuple[str, ...] = ("data", "model", "train")) -> None:
    """Resuming with other data, model or training settings would silently mix two runs (whose settings are in
    the file at `path`, a local path or a URI): refuse, naming them."""
    fs, where = resolve(path, "storage")
    if not exists(fs, where):
        return
    before = json.loads(read_bytes(fs, where))
    now = cfg.model_dump(mode="json")
    changed = [
        f"{section}.{key}: {before[section].get(key)!r} -> {value!r}"
        for section in sections
        for key, value in now[section].items()
        if before.get(section, {}).get(key) != value and f"{section}.{key}" not in RESUMABLE_CHANGES
    ]
    if changed:
        raise UserError(
            f"{cfg.run_dir} holds run {cfg.name} with other settings ({'; '.join(changed)}); "
            "change `name`, or remove that folder to start afresh"
        )


def train(
    cfg,
    callbacks: list = (),
    export_model: bool = True,
    init_checkpoint: str | None = None,
    prepared: tuple[dict, dict] | None = None,
    score: CheckpointScore = CheckpointScore(),
) -> dict:
    """Run one fine-tuning job end to end; returns the summary that is also written to summary.json.

    A tune trial passes its reporting `callbacks`, skips the model export (the campaign exports only its best
    trial's model), under PBT starts from another trial's checkpoint (`init_checkpoint`) when this run has none
    of its own yet, trains on the campaign's data already in the object store (`prepared`: datasets, report), and
    ranks its checkpoints by the campaign's metric (`score`).
    """
    started = time.time()
    with run_store(cfg.run_dir) as store:
        return _train(cfg, store, started, callbacks, export_model, init_checkpoint, prepared, score)


def _train(
    cfg,
    store,
    started: float,
    callbacks: list,
    export_model: bool,
    init_checkpoint: str | None,
    prepared: tuple[dict, dict] | None,
    score: CheckpointScore,
) -> dict:
    run_dir = store.local  # where this process writes the run's files (a staging copy of an object store's)
    if store.exists("checkpoint_manager_snapshot.json"):
        check_same_run(cfg, os.path.join(run_dir, RUN_CONFIG))
        say(
            f"resuming run {cfg.name} from its checkpoints in {cfg.run_dir} "
            "(change `name` or remove that folder to start afresh)",
        )
    with open(os.path.join(run_dir, RUN_CONFIG), "w", encoding="utf-8") as f:
        json.dump(cfg.model_dump(mode="json"), f, indent=2)
    store.push(RUN_CONFIG)
    t, d = cfg.train, cfg.data
    gpu, per_worker = worker_resources(cfg)
    memory = make_memory_plan(cfg, gpu)
    if memory["chosen"]["fits"] is False:
        raise UserError(explain(memory))

    if d.prepared:
        datasets, report = prepared or load_prepared(d.prepared)
        counts = {
            k: report[k] for k in ("records_in", "records", "rejected", "truncated", "rows", "sources") if k in report
        }
        say(f"data: prepared in {d.prepared}: {summary_line(report)}")
    else:
        say(
            f"data: Ray Data reads, validates, tokenizes{', packs' if d.packing else ''} and splits "
            + ", ".join(source.path for source in d.sources())
        )
        splits = build_splits(
            d, cfg.model.name_or_path, cfg.model.trust_remote_code, wait_s=placement_timeout(cfg.cluster)
        )
        datasets = {"train": splits.train, "val": splits.val, "test": splits.test}
        counts = count_records(splits.records, splits.sources)
        counts["rows"] = {split: ds.count() for split, ds in datasets.items()}  # materialized: free to count
        del splits  # the per-record dataset is no longer needed: let Ray free it
        say(
            f"data: {counts['records_in']} records in -> train {counts['records']['train']}, val "
            f"{counts['records']['val']}, test {counts['records']['test']}; rejected "
            + (", ".join(f"{k} {v}" for k, v in counts["rejected"].items()) or "0")
            + f"; truncated {counts['truncated']}; {counts['rows']['train']} training rows"
            + (f" (packed to {d.max_length} tokens)" if d.packing else ""),
        )
    for line in source_lines(counts):
        say(line)
    if counts["rows"]["train"] == 0:
        rejected = ", ".join(f"{k} {v}" for k, v in counts["rejected"].items()) or "none"
        raise UserError(
            f"data.train: no record to train on ({counts['records_in']} records in, rejected: {rejected}); "
            "`zeray prep` writes each rejected record with its reason to data/rejects.jsonl"
        )
    for split in ("val", "test"):
        if counts["rows"][split] == 0:
            raise UserError(f"data.split.{split}: no {split} records; raise data.split.{split} or add data")
    steps = make_plan(counts["rows"]["train"], t.max_workers, t.micro_batch_size, t.grad_accum, t.epochs, t.max_steps)
    # the user's DeepSpeed file, merged and checked for contradictions here, before any worker starts
    user_deepspeed = load_user_deepspeed(t.deepspeed) if t.deepspeed else None
    deepspeed_config(t, t.max_workers, memory["precision"], memory["hidden"], user_deepspeed)
    plan = WorkerPlan(
        **steps,
        packing=report["packing"] if d.prepared else d.packing,
        flops_per_token=memory["flops_per_token"],
        deepspeed=user_deepspeed,
        pad_token_id=load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code).pad_token_id,
        init_checkpoint=init_checkpoint,
        eval_base=t.eval_base and init_checkpoint is None,
    )
    say(
        f"plan: {t.workers_label()} workers x micro-batch {t.micro_batch_size} x accumulation {t.grad_accum}, "
        f"ZeRO {t.zero_stage}{' + CPU offload' if t.offload == 'cpu' else ''}, {plan.steps_per_epoch} "
        f"steps/epoch, {plan.total_steps} steps",
    )

    storage_fs, storage_path = resolve(cfg.storage, "storage")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", REPORT_POLL_S)
    with Tracking(cfg, store) as tracking:  # TensorBoard / MLflow / W&B, if asked for
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"run": cfg, "plan": plan},
            scaling_config=ScalingConfig(
                num_workers=t.num_workers,
                use_gpu=gpu,
                resources_per_worker=per_worker,
                placement_strategy=t.placement_strategy,
                elastic_resize_monitor_interval_s=t.elastic_resize_s,
            ),
            datasets=without_progress_bars(datasets),
            # the same example order on every run: what exact resume and reproducible curves rest on
            # nothing is split: every rank reads the ordered train stream and takes its slice of each global
            # micro-batch (see the loop), and likewise of val/test (see evaluate)
            dataset_config=DataConfig(datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True)),
            run_config=TrainRunConfig(
                name=cfg.name,
                storage_path=storage_path,
                storage_filesystem=storage_fs,
                failure_config=FailureConfig(max_failures=t.max_failures),
                # the best few by the score; Ray Train never deletes the latest, which resuming needs
                checkpoint_config=CheckpointConfig(
                    num_to_keep=t.keep_checkpoints,
                    checkpoint_score_attribute=score.metric,
                    checkpoint_score_order=score.mode,
                ),
                callbacks=[MetricsLog(store), *tracking.callbacks, *callbacks],
                logging_config=LoggingConfig(log_level="WARNING"),  # zeray prints its own progress
            ),
        )
        result = fit_or_explain(
            trainer, placement_timeout(cfg.cluster), elastic_min=(t.min_workers, per_worker) if t.elastic else None
        )
        if result.error:
            raise result.error
        rows = read_metrics(run_dir)  # every report (result.metrics holds only the latest checkpoint's)
        if rows and rows[-1].get("diverged"):
            raise UserError(
                f"training diverged at step {rows[-1]['step']}: the loss became {rows[-1]['loss']} "
                "(lower train.lr, raise train.warmup_ratio or train.grad_clip)"
            )

        final = result.metrics
        # (an earlier checkpoint damaged on disk, which this run resumed around, is no candidate)
        ranked = [
            (c, m)
            for c, m in result.best_checkpoints or []
            if score.metric in m and damage(c.path, c.filesystem) is None
        ]
        best, best_metrics = score.best(ranked) if ranked else (result.checkpoint, final)
        tested = {k: final[k] for k in ("test_loss", "test_perplexity", "test_token_accuracy")}
        tested_step = final["step"]  # whose weights the test numbers describe
        model_dir = os.path.join(run_dir, MODEL_DIR) if export_model else None
        if export_model:
            export(run_dir, model_dir, checkpoint=store.location(best.path))
            if best.path != result.checkpoint.path:  # an earlier checkpoint validated better: it is the model
                from trainers.evaluate import evaluate_model

                say(
                    f"model: the checkpoint of step {best_metrics['step']} ({score.metric} "
                    f"{best_metrics[score.metric]:.4f}) beats the last one ({final[score.metric]:.4f}); testing it",
                )
                tested, tested_step = evaluate_model(cfg, model_dir), best_metrics["step"]
            store.push(MODEL_DIR)
        train_rows = [r for r in rows if "tokens_per_s" in r]
        base = next((r for r in rows if "base_eval_loss" in r), {})  # (a run resumed by a re-run: its first part's)
        summary = {
            "base_eval_loss": base.get("base_eval_loss"),
            "base_eval_perplexity": base.get("base_eval_perplexity"),
            "eval_loss": best_metrics["eval_loss"],
            "eval_perplexity": best_metrics["eval_perplexity"],
            "eval_token_accuracy": best_metrics["eval_token_accuracy"],
            "test_loss": tested["test_loss"],
            "test_perplexity": tested["test_perplexity"],
            "test_token_accuracy": tested["test_token_accuracy"],
            "model_step": best_metrics["step"],
            "test_step": tested_step,
            "final_eval_loss": final["eval_loss"],
            "first_loss": train_rows[0]["loss"] if train_rows else None,
            "final_loss": train_rows[-1]["loss"] if train_rows else None,
            "tokens_per_s": _steady_tokens_per_s(train_rows),
            "mfu": _mean([r.get("mfu") for r in train_rows[1:] or train_rows]),
            "peak_memory_gb": max((r["peak_memory_gb"] for r in train_rows), default=None),
            "steps": final["step"],
            "wall_s": time.time() - started,
            "world_size": final["world_size"],  # (an elastic run's, at its end)
            "nodes": final["nodes"],
            "zero_stage": t.zero_stage,
            # what the workers ran with (the chunked loss only where it is exact for the model)
            "gradient_checkpointing": final["gradient_checkpointing"],
            "chunked_loss": final["chunked_loss"],
            "records": counts,
            "model_dir": f"{cfg.run_dir}/{MODEL_DIR}" if store.mirrored and export_model else model_dir,
            "checkpoint": store.location(best.path),
        }
        write_summary(run_dir, summary)
        store.push(SUMMARY_FILE)
        tracking.summary = summary
    plot_report(run_dir, rows)
    store.push(REPORT_FILE)
    return summary


def _mean(values: list) -> float | None:
    """Mean of the known values; None (unavailable) when the device peak is unknown, rather than a guess."""
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def _steady_tokens_per_s(rows: list[dict]) -> float | None:
    """Mean throughput of the logged windows, leaving out the first (it includes start-up and pipeline warm-up)."""
    steady = rows[1:] if len(rows) > 1 else rows
    return sum(r["tokens_per_s"] for r in steady) / len(steady) if steady else None
