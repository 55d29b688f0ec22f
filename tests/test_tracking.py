"""trainers/tracking.py without a training run: what the MLflow side does when its server goes away."""

import json
import os

import pytest
from conftest import write_config

from cluster.storage import run_store
from trainers.tracking import MLFLOW_RUN_FILE, Tracking
from zeray.config import load_config


def tracked(tmp_path, artifacts, **train):
    """The config of a run with these tracker settings (no training happens in these tests)."""
    return load_config(
        write_config(
            tmp_path / "run.yaml",
            name="tracked",
            storage=str(tmp_path / "runs"),
            data={"train": artifacts["data"], "format": "messages"},
            model={"name_or_path": artifacts["model"]},
            train=train,
        )
    )


@pytest.mark.reliability("fault", "the MLflow tracking store gone when the run ends")
@pytest.mark.parametrize("failed", [False, True])
def test_an_mlflow_store_gone_at_the_end_leaves_the_runs_own_outcome(artifacts, tmp_path, capsys, failed):
    db = tmp_path / "mlflow.db"
    cfg = tracked(tmp_path, artifacts, mlflow_uri=f"sqlite:///{db}", mlflow_experiment="tests")

    def run():
        with run_store(cfg.run_dir) as store, Tracking(cfg, store) as tracking:
            assert json.load(open(os.path.join(cfg.run_dir, MLFLOW_RUN_FILE)))["run_id"] == tracking.mlflow_run
            os.remove(db)  # the tracking store gone before the run is closed
            if failed:
                raise RuntimeError("the run's own error")
            tracking.summary = {"steps": 4, "eval_loss": 1.5}
            return tracking.mlflow_run

    if failed:  # the run's error, not the tracker's, reaches the user
        with pytest.raises(RuntimeError, match="the run's own error"):
            run()
    else:  # a finished run stays finished
        run_id = run()
        assert run_id
    err = capsys.readouterr().err
    assert (
        "warning: train.mlflow_uri: could not close MLflow run" in err and "the run's results are in its folder" in err
    )


def test_a_rerun_continues_its_wandb_run_and_missing_credentials_stop_it_in_one_line(
    artifacts, tmp_path, capsys, monkeypatch
):
    import time

    from test_train import wandb_records

    from core.errors import UserError
    from trainers import tracking as module

    cfg = tracked(tmp_path, artifacts, wandb_project="zeray-tests", wandb_entity="team", wandb_run_name="first try")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    opened = module.wandb_run

    def in_a_second_of_its_own(*args, **kwargs):
        # W&B names an offline run's folder by the second it opened: two openings of one run in the same second
        # can share a folder (wandb_init.set_sync_dir_suffix), the later file replacing the earlier. A run's own
        # openings (start, metrics, end) are seconds apart; this test's four come within a second or two.
        time.sleep(1 - time.time() % 1 + 0.01)
        return opened(*args, **kwargs)

    monkeypatch.setattr(module, "wandb_run", in_a_second_of_its_own)
    ids = []
    for attempt in (1, 2):  # the same command twice: the second continues the first's run
        with run_store(cfg.run_dir) as store, Tracking(cfg, store) as tracking:
            ids.append(tracking.wandb["run_id"])
            tracking.summary = {"steps": attempt, "eval_loss": 1.5}
    assert "W&B run" in capsys.readouterr().out
    assert ids[0] == ids[1] == json.load(open(os.path.join(cfg.run_dir, "wandb_run.json")))["run_id"]
    runs = [r.run for r in wandb_records(cfg.run_dir) if r.WhichOneof("record_type") == "run"]
    assert len(runs) == 4 and {(r.run_id, r.project, r.entity, r.display_name) for r in runs} == {
        (ids[0], "zeray-tests", "team", "first try")
    }

    # online without an API key: one line naming the key, before anything trains
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("HOME", str(tmp_path))  # (no ~/.netrc from `wandb login`)
    cfg.train.wandb_project = "other"
    with run_store(cfg.run_dir) as store, pytest.raises(UserError) as refused:
        Tracking(cfg, store)
    message = str(refused.value)
    assert message.startswith("train.wandb_project=other: ") and "WANDB_API_KEY" in message and "\n" not in message
