"""Elastic runs (`train.num_workers: [min, max]`): the global batch is max workers' micro-batches whatever the number
running, dealt so that every row is trained on once per step and every rank runs the same number of passes."""

import numpy as np
import pytest

from core.errors import UserError
from pipelines.chat import IGNORE
from trainers.config import TrainConfig
from trainers.deepspeed_config import deepspeed_config
from trainers.loop import deal


def unit(first: int, rows: int) -> dict:
    """A global micro-batch of `rows` rows whose token ids name the row (first, first+1, ...)."""
    ids = np.empty(rows, dtype=object)
    ids[:] = [np.full(3, first + i, dtype=np.int64) for i in range(rows)]
    labels = np.empty(rows, dtype=object)
    labels[:] = [np.full(3, first + i, dtype=np.int64) for i in range(rows)]
    return {"input_ids": ids, "labels": labels, "position_ids": ids, "num_tokens": np.full(rows, 3)}


def rows_of(batch: dict) -> list[int]:
    return [int(r[0]) for r in batch["input_ids"]]


@pytest.mark.parametrize("full, world, ga", [(2, 2, 1), (2, 1, 1), (3, 2, 1), (3, 2, 2), (4, 3, 3), (4, 1, 2)])
def test_every_row_of_a_step_is_trained_once_and_every_rank_runs_as_many_passes(full, world, ga):
    mb = 2
    units = [unit(100 * u, mb * full) for u in range(ga)]
    dealt = [deal(units, mb, full, rank, world) for rank in range(world)]
    per_rank = -(-ga * full // world)
    assert [len(d) for d in dealt] == [per_rank] * world  # the same number of forward/backward passes
    real = [row for d in dealt for b in d if b["num_tokens"].sum() for row in rows_of(b)]
    assert sorted(real) == sorted(row for u in units for row in rows_of(u))  # each row once
    padded = [b for d in dealt for b in d if not b["num_tokens"].sum()]
    assert len(padded) == per_rank * world - ga * full
    for b in padded:  # runs through the model, adds nothing to the loss
        assert all((label == IGNORE).all() for label in b["labels"])


def test_with_all_workers_rank_r_takes_slice_r_of_every_global_micro_batch():
    units = [unit(0, 6), unit(100, 6)]
    assert [rows_of(b) for b in deal(units, 2, 3, 1, 3)] == [[2, 3], [102, 103]]


def test_fewer_workers_accumulate_more_micro_batches_for_the_same_global_batch():
    train = TrainConfig(num_workers=[1, 4], micro_batch_size=2, grad_accum=3)
    full = deepspeed_config(train, 4, "fp32", 64)
    one = deepspeed_config(train, 1, "fp32", 64, grad_accum=12, load_universal=True)
    assert full["gradient_accumulation_steps"] == 3 and full["train_batch_size"] == 24
    assert one["gradient_accumulation_steps"] == 12 and one["train_batch_size"] == 24
    assert one["checkpoint"] == {"load_universal": True} and "checkpoint" not in full


def test_worker_ranges_are_validated_and_an_equal_range_is_a_fixed_run(tmp_path):
    from conftest import write_config

    from zeray.config import load_config

    config = write_config(tmp_path / "c.yaml", train={"num_workers": [2, 2]})
    t = load_config(config, check_paths=False).train
    assert t.num_workers == 2 and not t.elastic
    t = load_config(config, ["train.num_workers=[1,3]"], check_paths=False).train
    assert t.elastic and (t.min_workers, t.max_workers) == (1, 3) and t.workers_label() == "1-3 (elastic)"
    for bad in ("[3,1]", "[0,2]", "0"):
        with pytest.raises(UserError, match=r"train.num_workers .*elastic range \[min, max\]"):
            load_config(config, [f"train.num_workers={bad}"], check_paths=False)


def test_a_campaign_refuses_an_elastic_range(artifacts, tmp_path, capsys):
    from conftest import write_config

    from zeray.cli import main

    config = write_config(
        tmp_path / "c.yaml",
        data={"train": artifacts["data"]},
        model={"name_or_path": artifacts["model"]},
        train={"num_workers": [1, 2]},
    )
    assert main(["tune", config]) == 2
    assert "error: train.num_workers: a campaign runs trials side by side" in capsys.readouterr().err
