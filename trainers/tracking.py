"""Experiment trackers beside metrics.jsonl: TensorBoard event files (`train.tensorboard`, tensorboardX), an
MLflow run (`train.mlflow_uri`) and a Weights & Biases run (`train.wandb_project`).

All receive every report live, from the Ray Train controller (`Trackers`, a Ray Train callback). The MLflow and
W&B runs are opened by the driver before the workers start (with the run's config), kept in `mlflow_run.json` and
`wandb_run.json` so a re-run of the same command continues them, and closed by the driver with the summary
(`Tracking`). Credentials come only from each tool's own environment (MLFLOW_TRACKING_TOKEN,
MLFLOW_TRACKING_USERNAME/PASSWORD, cloud ones; WANDB_API_KEY or `wandb login`): the config refuses an MLflow URI with
a user or password in it, since it is written into the run's folder.

A W&B run is one writer at a time (W&B resumes a run by its id, sequentially): the driver opens it, logs the config
and closes it; the controller resumes it for the reports and closes it at the final one; the driver resumes it for
the summary. WANDB_MODE=offline keeps all of it in files under `<run>/wandb/` (`wandb sync` uploads them later);
the driver's mode is the controller's too.
"""

import json
import math
import os
import secrets
import time

from ray.train.v2.api.callback import UserCallback

from core.console import say, warn
from core.errors import UserError, first_line
from core.keys import flatten

TENSORBOARD_DIR = "tensorboard"
MLFLOW_RUN_FILE = "mlflow_run.json"
WANDB_RUN_FILE = "wandb_run.json"
WANDB_DIR = "wandb"  # W&B's own folder under the run's (dir=<run>)


def _client(uri: str):
    try:
        from mlflow import MlflowClient
    except ImportError:
        raise UserError("train.mlflow_uri needs MLflow: pip install 'zeray[mlflow]' (or mlflow)") from None
    return MlflowClient(tracking_uri=uri)


def start_mlflow_run(cfg, run_dir: str) -> str:
    """The MLflow run of this zeray run: the one an earlier attempt opened (a re-run resumes it: `run_dir` is the
    local folder holding the run's files), else a new one in experiment `train.mlflow_experiment` with the config
    as parameters. Returns its id."""
    t = cfg.train
    client = _client(t.mlflow_uri)
    path = os.path.join(run_dir, MLFLOW_RUN_FILE)
    try:
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                run_id = json.load(f)["run_id"]
            client.update_run(run_id, status="RUNNING")
            return run_id
        experiment = client.get_experiment_by_name(t.mlflow_experiment)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(t.mlflow_experiment)
        run = client.create_run(experiment_id, run_name=cfg.name, tags={"zeray.run_dir": cfg.run_dir})
        from mlflow.entities import Param

        params = [Param(k, str(v)[:6000]) for k, v in sorted(flatten(cfg.model_dump(mode="json")).items())]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
            client.log_batch(run.info.run_id, params=params[i : i + 100])
    except UserError:
        raise
    except Exception as exc:  # unreachable server, refused credentials, a bad URI
        raise UserError(f"train.mlflow_uri={t.mlflow_uri}: {first_line(exc, 300)}") from None
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"run_id": run.info.run_id, "experiment_id": experiment_id}, f)
    return run.info.run_id


def end_mlflow_run(uri: str, run_id: str, summary: dict | None) -> None:
    """The summary's numbers as the run's final metrics, and its status: FINISHED, or FAILED without a summary."""
    from mlflow.entities import Metric

    client = _client(uri)
    if summary is not None:
        now = int(time.time() * 1000)
        client.log_batch(
            run_id,
            metrics=[
                Metric(f"final/{k}", float(v), now, int(summary.get("steps") or 0))
                for k, v in sorted(summary.items())
                if _number(v)
            ],
        )
    client.set_terminated(run_id, "FINISHED" if summary is not None else "FAILED")


def _wandb():
    try:
        import wandb
    except ImportError:
        raise UserError("train.wandb_project needs Weights & Biases: pip install 'zeray[wandb]' (or wandb)") from None
    return wandb


def wandb_run(wandb_cfg: dict, **kwargs):
    """Resume (or create) the run `wandb_cfg` names: its id, project, entity, name, mode and folder."""
    wandb = _wandb()
    return wandb.init(
        id=wandb_cfg["run_id"],
        project=wandb_cfg["project"],
        entity=wandb_cfg["entity"],
        name=wandb_cfg["name"],
        mode=wandb_cfg["mode"],
        dir=wandb_cfg["dir"],
        resume="allow",
        # zeray prints its own lines: W&B's go to its debug logs, and it does not take over the console
        settings=wandb.Settings(silent=True, console="off", save_code=False),
        **kwargs,
    )


def start_wandb_run(cfg, run_dir: str) -> dict:
    """The W&B run of this zeray run: the one an earlier attempt opened (its id in `wandb_run.json`), else a new one,
    with the config. Opening it here checks the credentials and project before any worker starts. Returns what
    the controller needs to resume it."""
    t = cfg.train
    path = os.path.join(run_dir, WANDB_RUN_FILE)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            run_id = json.load(f)["run_id"]
    else:
        run_id = secrets.token_hex(6)  # (W&B's rule: unique in the project, letters and digits)
    wandb_cfg = {
        "run_id": run_id,
        "project": t.wandb_project,
        "entity": t.wandb_entity,
        "name": t.wandb_run_name or cfg.name,
        # W&B's own variable, read now (W&B reads its environment once per process), and the controller's mode too
        "mode": os.environ.get("WANDB_MODE") or None,
        "dir": run_dir,
    }
    try:
        run = wandb_run(wandb_cfg, config=flatten(cfg.model_dump(mode="json")))
        wandb_cfg["mode"] = "offline" if run.offline else "online"
        url = run.url
        run.finish()
    except UserError:
        raise
    except Exception as exc:  # no credentials, an unknown entity, an unreachable server
        raise UserError(
            f"train.wandb_project={t.wandb_project}: {first_line(exc, 300)} (credentials: WANDB_API_KEY or "
            "`wandb login`; WANDB_MODE=offline keeps the run in files)"
        ) from None
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"run_id": run_id, "project": t.wandb_project, "entity": t.wandb_entity, "url": url}, f)
    where = url if url else f"offline, in {os.path.join(run_dir, WANDB_DIR)} (wandb sync uploads it)"
    say(f"W&B run {run_id}: {where}")
    return wandb_cfg


def end_wandb_run(wandb_cfg: dict, summary: dict | None) -> None:
    """The summary's numbers as the run's final values (`final/<key>`); a run without a summary ends as failed."""
    run = wandb_run(wandb_cfg)
    if summary is not None:
        run.summary.update({f"final/{k}": float(v) for k, v in sorted(summary.items()) if _number(v)})
    run.finish(exit_code=0 if summary is not None else 1)


class Tracking:
    """The trackers a run asked for: `callbacks` for the Train controller; set `summary` once the run succeeded.
    Their files go to the run's `store` (cluster.storage.RunStore)."""

    def __init__(self, cfg, store):
        t = cfg.train
        self.store = store
        self.mlflow_uri = t.mlflow_uri
        self.mlflow_run = self.wandb = None
        if t.wandb_project:  # (first: its opening closes itself, so a refusal below leaves nothing open)
            self.wandb = start_wandb_run(cfg, store.local)
            store.push(WANDB_RUN_FILE)
            store.push(WANDB_DIR)
        if t.mlflow_uri:
            self.mlflow_run = start_mlflow_run(cfg, store.local)
            store.push(MLFLOW_RUN_FILE)
        wanted = t.tensorboard or self.mlflow_run or self.wandb
        self.callbacks = [Trackers(store, t.tensorboard, t.mlflow_uri, self.mlflow_run, self.wandb)] if wanted else []
        self.summary: dict | None = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        summary = self.summary if exc[0] is None else None
        if self.mlflow_run:
            try:
                end_mlflow_run(self.mlflow_uri, self.mlflow_run, summary)
            except Exception as error:  # the tracking server gone by the end: the run's own outcome stands
                _warn(f"train.mlflow_uri: could not close MLflow run {self.mlflow_run} ({first_line(error, 300)})")
        if self.wandb:
            try:
                end_wandb_run(self.wandb, summary)
            except Exception as error:
                _warn(f"train.wandb_project: could not close W&B run {self.wandb['run_id']} ({first_line(error, 300)})")
            self.store.push(WANDB_DIR)


def _warn(what: str) -> None:
    warn(f"{what}; the run's results are in its folder")


class Trackers(UserCallback):
    """Every report's numbers to TensorBoard, MLflow and W&B, as asked, at its step (runs in the Train controller)."""

    def __init__(
        self,
        store,
        tensorboard: bool,
        mlflow_uri: str | None = None,
        mlflow_run: str | None = None,
        wandb_cfg: dict | None = None,
    ):
        self.store = store
        self.tensorboard_dir = os.path.join(store.local, TENSORBOARD_DIR) if tensorboard else None
        self.mlflow_uri, self.mlflow_run = mlflow_uri, mlflow_run
        self.wandb_cfg = wandb_cfg
        self._writer = self._client = self._wandb = None

    def after_report(self, run_context, metrics, checkpoint):
        row = metrics[0]
        step = int(row.get("step", 0))
        numbers = {k: float(v) for k, v in row.items() if k not in ("step", "final") and _number(v)}
        if self.tensorboard_dir:
            if self._writer is None:
                from tensorboardX import SummaryWriter

                self._writer = SummaryWriter(self.tensorboard_dir)
            for key, value in numbers.items():
                eval_key = key.startswith(("eval_", "base_eval_"))
                self._writer.add_scalar(f"{'eval' if eval_key else 'train'}/{key}", value, step)
            if row.get("final"):  # the controller ends right after this: write out the queue (flush does not)
                self._writer.close()
                self._writer = None
            else:
                self._writer.flush()
            self.store.push(TENSORBOARD_DIR)  # (an object store's copy follows the run)
        if self.mlflow_run:
            from mlflow.entities import Metric

            if self._client is None:
                self._client = _client(self.mlflow_uri)
            now = int(time.time() * 1000)
            self._client.log_batch(self.mlflow_run, metrics=[Metric(k, v, now, step) for k, v in numbers.items()])
        if self.wandb_cfg:
            if self._wandb is None:
                self._wandb = wandb_run(self.wandb_cfg)
            # (a step replayed after a restart from a checkpoint is older than W&B's last: W&B keeps the first)
            self._wandb.log(numbers, step=step)
            if row.get("final"):  # the driver resumes it for the summary
                self._wandb.finish()
                self._wandb = None
                self.store.push(WANDB_DIR)

    def __getstate__(self):  # sent to the controller before anything is opened
        return {**self.__dict__, "_writer": None, "_client": None, "_wandb": None}


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
