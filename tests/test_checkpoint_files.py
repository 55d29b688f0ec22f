"""A checkpoint cut short on disk is told apart from a whole one by the file lists its ranks wrote last."""

import json
import shutil

import pytest

from core.errors import UserError
from trainers.checkpoints import STATE_FILE, LoopState, damage, find_checkpoint, intact_checkpoint, write_manifest


def fake_checkpoint(run, name: str, step: int, world: int = 2):
    """What Ray Train makes of `world` ranks' folders: merged into one, each rank's list beside its files."""
    folder = run / name
    for rank in range(world):
        staging = run / f"staging-{rank}"
        (staging / "ds").mkdir(parents=True)
        (staging / "ds" / f"zero_pp_rank_{rank}_optim_states.pt").write_bytes(b"x" * 100)
        if rank == 0:
            LoopState(step=step, epoch=0, batches_in_epoch=step, world=world).write(str(staging))
        write_manifest(str(staging), rank)
        shutil.copytree(staging, folder, dirs_exist_ok=True)
        shutil.rmtree(staging)
    return folder


def test_whole_truncated_and_incomplete_checkpoints(tmp_path):
    early = fake_checkpoint(tmp_path, "checkpoint_2026-01-01_00-00-01", step=4)
    late = fake_checkpoint(tmp_path, "checkpoint_2026-01-01_00-00-02", step=8)
    assert damage(str(early)) is None and damage(str(late)) is None
    assert intact_checkpoint(str(late)) == (str(late), None)

    shard = late / "ds" / "zero_pp_rank_1_optim_states.pt"
    shard.write_bytes(b"x" * 40)
    assert damage(str(late)) == "ds/zero_pp_rank_1_optim_states.pt has 40 of its 100 bytes"
    assert intact_checkpoint(str(late)) == (str(early), damage(str(late)))
    assert find_checkpoint(str(tmp_path)) == str(early)  # `zeray export` of the run skips it too
    with pytest.raises(UserError, match="is damaged"):
        find_checkpoint(str(tmp_path), str(late))

    (early / "zeray_files.rank1.json").unlink()  # a rank's files never arrived
    assert damage(str(early)) == "the files of 1 of its 2 ranks"
    with pytest.raises(UserError, match="has no intact one before it; remove the run's folder"):
        intact_checkpoint(str(late))
    shard.unlink()
    assert damage(str(late)) == "ds/zero_pp_rank_1_optim_states.pt missing"
    (late / STATE_FILE).write_text("{trunc")
    assert damage(str(late)) == f"{STATE_FILE} unreadable: JSONDecodeError"


def test_checkpoints_of_earlier_versions_are_taken_as_they_are(tmp_path):
    (tmp_path / "ds").mkdir()
    (tmp_path / STATE_FILE).write_text(json.dumps({"step": 3, "epoch": 0, "batches_in_epoch": 3}))
    assert damage(str(tmp_path)) is None
