"""Experiment trackers beside metrics.jsonl: TensorBoard event files (`train.tensorboard`, tensorboardX) and an
MLflow run (`train.mlflow_uri`).

Both receive every report live, from the Ray Train controller (`Trackers`, a Ray Train callback). The MLflow run
is opened by the driver before the workers start (parameters: the run's config), kept in `mlflow_run.json` so a
re-run of the same command continues it, and closed by the driver with the summary (`Tracking`). Credentials come
only from MLflow's own environment variables (MLFLOW_TRACKING_TOKEN, MLFLOW_TRACKING_USERNAME/PASSWORD, cloud
ones): the config refuses a URI with a user or password in it, since it is written into the run's folder.
"""

import json
import math
import os
import sys
import time

from ray.train.v2.api.callback import UserCallback

from zeray.config import flatten
from zeray.errors import UserError

TENSORBOARD_DIR = "tensorboard"
MLFLOW_RUN_FILE = "mlflow_run.json"


def _client(uri: str):
    try:
        from mlflow import MlflowClient
    except ImportError:
        raise UserError("train.mlflow_uri needs MLflow: pip install 'zeray[mlflow]' (or mlflow)") from None
    return MlflowClient(tracking_uri=uri)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else exc.__class__.__name__


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
        raise UserError(f"train.mlflow_uri={t.mlflow_uri}: {_first_line(exc)}") from None
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


class Tracking:
    """The trackers a run asked for: `callbacks` for the Train controller; set `summary` once the run succeeded.
    Their files go to the run's `store` (cluster.storage.RunStore)."""

    def __init__(self, cfg, store):
        t = cfg.train
        self.mlflow_uri = t.mlflow_uri
        self.mlflow_run = None
        if t.mlflow_uri:
            self.mlflow_run = start_mlflow_run(cfg, store.local)
            store.push(MLFLOW_RUN_FILE)
        wanted = t.tensorboard or self.mlflow_run
        self.callbacks = [Trackers(store, t.tensorboard, t.mlflow_uri, self.mlflow_run)] if wanted else []
        self.summary: dict | None = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if not self.mlflow_run:
            return
        try:
            end_mlflow_run(self.mlflow_uri, self.mlflow_run, self.summary if exc[0] is None else None)
        except Exception as error:  # the tracking server gone by the end: the run's own outcome stands
            print(
                f"warning: train.mlflow_uri: could not close MLflow run {self.mlflow_run} ({_first_line(error)}); "
                "the run's results are in its folder",
                file=sys.stderr,
                flush=True,
            )


class Trackers(UserCallback):
    """Every report's numbers to TensorBoard and/or MLflow, at its step (runs in the Train controller)."""

    def __init__(self, store, tensorboard: bool, mlflow_uri: str | None = None, mlflow_run: str | None = None):
        self.store = store
        self.tensorboard_dir = os.path.join(store.local, TENSORBOARD_DIR) if tensorboard else None
        self.mlflow_uri, self.mlflow_run = mlflow_uri, mlflow_run
        self._writer = self._client = None

    def after_report(self, run_context, metrics, checkpoint):
        row = metrics[0]
        step = int(row.get("step", 0))
        numbers = {k: float(v) for k, v in row.items() if k not in ("step", "final") and _number(v)}
        if self.tensorboard_dir:
            if self._writer is None:
                from tensorboardX import SummaryWriter

                self._writer = SummaryWriter(self.tensorboard_dir)
            for key, value in numbers.items():
                self._writer.add_scalar(f"{'eval' if key.startswith('eval_') else 'train'}/{key}", value, step)
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

    def __getstate__(self):  # sent to the controller before anything is opened
        return {**self.__dict__, "_writer": None, "_client": None}


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
