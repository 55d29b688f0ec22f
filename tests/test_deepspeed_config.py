"""A user's DeepSpeed JSON merges under zeray's settings: extras stay, contradictions are one-line errors."""

import json
import os

import pytest

from core.errors import UserError
from trainers.config import TrainConfig
from trainers.deepspeed_config import deepspeed_config, load_user_deepspeed


def build(user, **train):
    return deepspeed_config(TrainConfig(deepspeed="ds.json", **train), 2, "fp32", 256, user)


def test_users_extra_settings_and_overridable_defaults_are_kept():
    user = {
        "zero_optimization": {
            "overlap_comm": False,
            "contiguous_gradients": True,
            "stage": 3,
            "reduce_bucket_size": 123,
        },
        "activation_checkpointing": {"partition_activations": True},
        "steps_per_print": 5,
        "train_batch_size": 8,
    }  # equal to zeray's: allowed
    merged = build(user, zero_stage=3, micro_batch_size=4)
    assert merged["zero_optimization"]["overlap_comm"] is False
    assert merged["zero_optimization"]["reduce_bucket_size"] == 123  # the user's, over zeray's default
    assert merged["zero_optimization"]["stage3_prefetch_bucket_size"] == int(0.9 * (1 << 20))
    assert merged["activation_checkpointing"] == {"partition_activations": True}
    assert merged["steps_per_print"] == 5
    assert merged["train_batch_size"] == 8 and merged["train_micro_batch_size_per_gpu"] == 4


def test_bucket_sizes_follow_the_model_at_every_zero_stage():
    zero = {
        stage: deepspeed_config(TrainConfig(zero_stage=stage), 2, "fp32", hidden)["zero_optimization"]
        for stage, hidden in ((0, 576), (2, 576), (1, 8192), (3, 2048))
    }
    assert "reduce_bucket_size" not in zero[0]  # ZeRO-0's allreduce keeps DeepSpeed's own
    assert zero[2]["reduce_bucket_size"] == zero[2]["allgather_bucket_size"] == 1 << 24  # the floor, not 576^2
    assert zero[1]["reduce_bucket_size"] == zero[1]["allgather_bucket_size"] == 8192 * 8192
    assert zero[3]["reduce_bucket_size"] == 2048 * 2048
    # a user's own bucket sizes win over zeray's at ZeRO-1/2 too
    user = {"zero_optimization": {"allgather_bucket_size": 5e8}}
    assert build(user, zero_stage=2)["zero_optimization"]["allgather_bucket_size"] == 5e8


@pytest.mark.parametrize(
    "user, needle",
    [
        (
            {"train_batch_size": 64},
            "sets train_batch_size=64 but zeray sets 8 from train.micro_batch_size x "
            "train.grad_accum x train.num_workers",
        ),
        ({"zero_optimization": {"stage": 3}}, "sets zero_optimization.stage=3 but zeray sets 2 from train.zero_stage"),
        ({"bf16": {"enabled": True}}, "sets bf16.enabled=true but zeray sets false from model.dtype"),
        ({"optimizer": {"type": "Adam", "params": {"lr": 1}}}, "sets optimizer="),
    ],
)
def test_contradictions_name_the_setting_and_the_zeray_key(user, needle):
    with pytest.raises(UserError) as err:
        build(user, micro_batch_size=4)
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert str(err.value).startswith("train.deepspeed: ds.json sets ")


def test_file_problems_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_user_deepspeed(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="is not valid JSON"):
        load_user_deepspeed(str(bad))
    bad.write_text("[1, 2]")
    with pytest.raises(UserError, match="must hold a JSON object"):
        load_user_deepspeed(str(bad))
    bad.write_text(json.dumps({"scheduler": {"type": "WarmupLR"}}))
    with pytest.raises(UserError, match="zeray builds the schedule from train.lr_schedule"):
        load_user_deepspeed(str(bad))


def test_deepspeed_ops_are_built_by_this_pythons_ninja_into_its_own_cache(monkeypatch):
    """Whatever ninja PATH finds first (the system's 1.11 here) would rebuild the ops the other built, and so would
    another environment sharing ~/.cache/torch_extensions; a cache the user chose stays theirs."""
    import shutil
    import sys

    import ninja

    from trainers.deepspeed_ops import use_own_op_builds

    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    use_own_op_builds()
    use_own_op_builds()  # once is enough
    assert os.environ["PATH"] == os.pathsep.join([ninja.BIN_DIR, "/usr/bin", "/bin"])
    assert shutil.which("ninja") == os.path.join(ninja.BIN_DIR, "ninja")
    assert os.environ["TORCH_EXTENSIONS_DIR"] == os.path.join(sys.prefix, "torch_extensions")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/srv/ops")
    use_own_op_builds()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == "/srv/ops"


def test_deepspeed_is_imported_without_mlflow_which_stays_importable():
    """Each worker imports DeepSpeed; its autotuner's MLflow import (0.8 s of CPU per worker) is left out, and a
    later `import mlflow` in the same process still works."""
    import subprocess
    import sys

    probe = (
        "import sys\n"
        "from trainers.deepspeed_ops import import_deepspeed\n"
        "deepspeed = import_deepspeed()\n"
        "print('probe', 'mlflow' in sys.modules, deepspeed.initialize.__module__)\n"
        "import mlflow\n"
        "print('probe', mlflow.MlflowClient.__name__)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    said = [line.split()[1:] for line in done.stdout.splitlines() if line.startswith("probe ")]  # (DeepSpeed logs too)
    assert said == [["False", "deepspeed"], ["MlflowClient"]]
