"""One trial of a campaign, run by Ray Tune in its trial actor (the Train V2 pattern: the trial function builds and
fits a TorchTrainer): the trial's values applied to the campaign's config, then the same training run as
`zeray train`, its evaluations reported to Tune.

Folder of one trial (Tune's trial folder):
    train/         the trial's training run (config.json, metrics.jsonl, summary.json, Ray Train checkpoints)
    train-2/ ...   under PBT, each continuation from another trial's checkpoint is a new run
    start-2/ ...   the checkpoint that run started from, copied before the source trial could delete it
    zeray_run.json which run is current, and what it started from
"""

import json
import os
import posixpath
import tempfile
import threading

import ray
import ray.tune
from ray.train.v2.api.callback import UserCallback
from ray.tune.integration.ray_train import TuneReportCallback
from ray.util.queue import Queue

from core.fs import display, exists, join, read_bytes, resolve, upload, write_bytes
from core.section import with_values
from trainers.checkpoints import CheckpointScore
from trainers.run import train
from tuning.space import trial_config

RUN_FILE = "zeray_run.json"
FIRST_RUN = "train"


@ray.remote(num_cpus=0)
class FirstClaim:
    """Which trial evaluates the base model: the first to ask. The trials share the data and start from the same
    model, so one evaluation serves the whole campaign."""

    def __init__(self):
        self.taken = False

    def claim(self) -> bool:
        taken, self.taken = self.taken, True
        return not taken


def run_trial(
    params: dict, base, campaign_dir: str, pbt: bool, prepared: tuple[dict, dict] | None, base_eval=None
) -> None:
    """Tune's trainable: `params` are the trial's sampled values (nested like the config); `prepared` is the
    campaign's data (datasets, report) when every trial trains on the same, and then `base_eval` (a FirstClaim)
    picks the one trial that evaluates the base model."""
    cfg = trial_config(base, params)
    if base_eval is not None and cfg.train.eval_base:
        cfg = with_values(cfg, {"train.eval_base": ray.get(base_eval.claim.remote())}, "tune")
    # the trial's folder in the campaign's storage (get_trial_dir() is a local staging folder Tune syncs from)
    trial_dir = join(campaign_dir, os.path.basename(ray.tune.get_context().get_trial_dir()))
    name, start_from = current_run(trial_dir, ray.tune.get_checkpoint())
    cfg.storage, cfg.name = trial_dir, name
    score = CheckpointScore(cfg.tune.metric, cfg.tune.mode)  # a trial keeps what the campaign chooses among
    if pbt:
        _train_reporting_checkpoints(cfg, start_from, prepared, score)
    else:
        train(cfg, callbacks=[EvalReport(cfg.tune.metric)], export_model=False, prepared=prepared, score=score)


class EvalReport(TuneReportCallback):
    """Tune sees the evaluations (each carries the metric and its step); training-progress reports stay in
    metrics.jsonl."""

    def __init__(self, metric: str):
        super().__init__()
        self.metric = metric

    def after_report(self, run_context, metrics, checkpoint):
        if self.metric in metrics[0] and "started_from" not in metrics[0]:
            super().after_report(run_context, metrics, checkpoint)


class CheckpointsToTune(UserCallback):
    """PBT: each checkpoint (with the evaluation it carries) goes to the trial, which reports it to Tune as a Tune
    checkpoint: PBT clones trials from those. Runs in the Train controller; a Ray queue carries the reports."""

    def __init__(self, queue: Queue):
        self.queue = queue

    def after_report(self, run_context, metrics, checkpoint):
        if checkpoint is not None:
            self.queue.put((dict(metrics[0]), checkpoint))


def _train_reporting_checkpoints(cfg, start_from: str | None, prepared, score: CheckpointScore) -> dict:
    queue = Queue(actor_options={"num_cpus": 0})
    failed: list[BaseException] = []

    def forward() -> None:
        while (item := queue.get()) is not None:
            metrics, checkpoint = item
            try:
                ray.tune.report(metrics, checkpoint=checkpoint)
            except BaseException as exc:  # surfaced by the trial thread below
                failed.append(exc)
                return

    reporter = threading.Thread(target=forward, name="zeray-pbt-report", daemon=True)
    reporter.start()
    try:
        summary = train(
            cfg,
            callbacks=[CheckpointsToTune(queue)],
            export_model=False,
            init_checkpoint=start_from,
            prepared=prepared,
            score=score,
        )
    finally:
        queue.put(None)
        reporter.join()
    if failed:
        raise failed[0]
    return summary


def current_run(trial_dir: str, checkpoint) -> tuple[str, str | None]:
    """The training run this trial (re)starts, and the checkpoint it starts from when it has none of its own.

    No checkpoint from Tune, one of this trial's own (a resumed campaign) or the one the current run started from:
    go on with the current run, which resumes from its own checkpoints. Another trial's checkpoint (a PBT
    exploit): copy it here at once and start the next run from the copy. `trial_dir` is a local path or a URI.
    """
    fs, trial = resolve(trial_dir, "storage")
    state = {"run": FIRST_RUN, "from": None}
    if exists(fs, f"{trial}/{RUN_FILE}"):
        state = json.loads(read_bytes(fs, f"{trial}/{RUN_FILE}"))
    if (
        checkpoint is None
        or posixpath.normpath(checkpoint.path).startswith(trial + "/")
        or checkpoint.path == state.get("source")
    ):  # the exploit this run already started from
        return state["run"], state["from"]
    number = int(state["run"].rpartition("-")[2]) + 1 if "-" in state["run"] else 2
    copy = f"{trial}/start-{number}"
    if exists(fs, copy):  # a copy cut short when this trial died
        fs.delete_dir(copy)
    with tempfile.TemporaryDirectory(prefix="zeray-exploit-") as local:
        checkpoint.to_directory(local)
        upload(local, fs, copy)
    state = {"run": f"{FIRST_RUN}-{number}", "from": display(fs, copy), "source": checkpoint.path}
    write_bytes(fs, f"{trial}/{RUN_FILE}", json.dumps(state).encode())
    return state["run"], state["from"]
