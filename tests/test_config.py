import os
import subprocess
import sys

import pytest
from conftest import REPO, write_config

from core.errors import UserError
from zeray.config import load_config, parse_value


@pytest.fixture
def config(tmp_path, artifacts):
    return write_config(
        tmp_path / "run.yaml",
        name="t",
        data={"train": artifacts["data"]},
        model={"name_or_path": artifacts["model"]},
        train={"lr": 1.0e-3},
    )


def test_demo_config_is_valid_as_shipped():
    cfg = load_config(os.path.join(REPO, "configs", "demo.yaml"), check_paths=False)
    assert cfg.name == "chat-demo"
    assert cfg.train.zero_stage == 2 and cfg.train.num_workers == 2
    assert cfg.data.format == "messages"
    # the defaults: the chunked loss on (it is exact), gradient checkpointing off (it costs a recomputation)
    assert (cfg.train.chunked_loss, cfg.train.gradient_checkpointing) == (True, False)
    assert os.path.isabs(cfg.storage) and os.path.isabs(cfg.data.train) and os.path.isabs(cfg.model.name_or_path)


def test_the_7b_example_config_is_valid_and_uses_the_memory_savers():
    cfg = load_config(os.path.join(REPO, "configs", "llama-7b.yaml"), check_paths=False)
    t = cfg.train
    assert (t.num_workers, t.zero_stage, t.gradient_checkpointing, t.chunked_loss) == (8, 3, True, True)
    assert (cfg.model.dtype, cfg.model.attn_implementation, t.use_gpu) == ("bf16", "auto", True)
    assert t.micro_batch_size * t.grad_accum * t.num_workers == 128  # as its comment says


def test_overrides_apply_with_yaml_types(config):
    cfg = load_config(config, ["train.lr=3e-4", "train.max_steps=7", "data.split.val=0.2", "train.use_gpu=false"])
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.train.max_steps == 7
    assert cfg.data.split.val == pytest.approx(0.2)
    assert cfg.train.use_gpu is False


def test_unknown_key_names_key_file_and_suggestion(config):
    with pytest.raises(UserError) as err:
        load_config(config, ["train.lrr=1"])
    assert str(err.value) == f"unknown key train.lrr in {config} (override train.lrr=1) (did you mean train.lr?)"


def test_unknown_key_in_file(tmp_path, artifacts):
    path = write_config(tmp_path / "bad.yaml", data={"train": artifacts["data"], "max_lenght": 10})
    with pytest.raises(
        UserError, match=r"unknown key data.max_lenght in .*bad.yaml \(did you mean data.max_length\?\)"
    ):
        load_config(path)


def test_a_key_no_one_could_type_is_quoted_in_a_one_line_error(tmp_path, artifacts):
    path = write_config(tmp_path / "odd.yaml", data={"train": artifacts["data"], "max length\n": 10})
    with pytest.raises(UserError) as err:
        load_config(path)
    assert str(err.value).startswith("unknown key data['max length\\n'] in ") and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.lr=abc", "invalid value for train.lr"),
        ("train.zero_stage=4", "invalid value for train.zero_stage"),
        ("train.num_workers=0", "invalid value for train.num_workers"),
        ("data.split.val=1.5", "invalid value for data.split.val"),
        ("data.format=xml", "invalid value for data.format"),
        ("model.trust_remote_code=maybe", "invalid value for model.trust_remote_code"),
        ("train.offload=gpu", "invalid value for train.offload"),
        ("data.overlong=drop", "invalid value for data.overlong"),
        # a union says each way to be valid, under the key's own name
        ("data.tokenizer_actors=0", "invalid value for data.tokenizer_actors in"),
        ("data.tokenizer_actors=0", "greater than or equal to 1 or Input should be 'auto' (got 0)"),
        # a mixture's sources: the source and field named, not the union's other member (a plain string)
        ("data.train=[{path: a.jsonl, weight: -1}]", "invalid value for data.train[0].weight in"),
        ("data.train=[{pat: a.jsonl}]", "missing key data.train[0].path in"),
        ("data.train=[{path: a.jsonl, format: xml}]", "invalid value for data.train[0].format in"),
        # line breaks in an override are shown escaped: the error stays one line
        ("\n=", "override '\\n=' must look like section.key=value"),
        ("train.lr=1\n2", "(override 'train.lr=1\\n2')"),
    ],
)
def test_bad_values_are_one_line_errors(config, override, needle):
    with pytest.raises(UserError) as err:
        load_config(config, [override])
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_val_plus_test_must_leave_training_data(config):
    with pytest.raises(UserError, match="val \\+ test must be below 1.0"):
        load_config(config, ["data.split.val=0.5", "data.split.test=0.5"])


def test_missing_data_file_and_model_dir(config, tmp_path):
    with pytest.raises(UserError, match=r"data.train: .*nope.jsonl does not exist"):
        load_config(config, [f"data.train={tmp_path}/nope.jsonl"])
    with pytest.raises(UserError, match=r"model.name_or_path: directory .*missing-model does not exist"):
        load_config(config, [f"model.name_or_path={tmp_path}/missing-model"])


def test_a_mixtures_sources_are_checked_each_by_its_own_key(config, artifacts, tmp_path):
    data = artifacts["data"]
    with pytest.raises(UserError, match=r"^data.train\[1\].path: .*nope.jsonl does not exist"):
        load_config(config, [f"data.train=[{{path: {data}}}, {{path: {tmp_path}/nope.jsonl}}]"])
    with pytest.raises(UserError, match=r"^data.train\[1\].path: .* is also in data.train\[0\].path"):
        load_config(config, [f"data.train=[{{path: {os.path.dirname(data)}}}, {{path: {data}}}]"])
    with pytest.raises(UserError, match="a source may appear once in data.train"):
        load_config(config, [f"data.train=[{{path: {data}}}, {{path: {data}, weight: 2}}]"])
    cfg = load_config(config, [f"data.train=[{{path: {data}, weight: 3}}]"])
    assert [(s.path, s.weight, s.format) for s in cfg.data.sources()] == [(data, 3.0, None)]


def test_bad_yaml_and_missing_config(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("train:\n  lr: [1,\n")
    with pytest.raises(UserError, match=r"config file .*broken.yaml line \d+"):
        load_config(str(bad))
    with pytest.raises(UserError, match="config file .*absent.yaml does not exist"):
        load_config(str(tmp_path / "absent.yaml"))
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="must be a YAML mapping"):
        load_config(str(listy))


def test_malformed_override(config):
    with pytest.raises(UserError, match="must look like section.key=value"):
        load_config(config, ["train.lr"])
    with pytest.raises(UserError, match="train.lr is a value, not a section"):
        load_config(config, ["train.lr.x=1"])


def test_parse_value():
    assert parse_value("1e-4") == pytest.approx(1e-4)
    assert parse_value("true") is True
    assert parse_value("null") is None
    assert parse_value("[1, 2]") == [1, 2]
    assert parse_value("hello") == "hello"


def test_cli_exits_2_with_one_line_naming_the_key():
    """The acceptance check, through the real entry point in a fresh process (no Ray is started)."""
    proc = subprocess.run(
        [sys.executable, "-m", "zeray", "train", "configs/demo.yaml", "train.lrr=1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: unknown key train.lrr in configs/demo.yaml")
    assert "did you mean train.lr?" in lines[0]


def test_prepared_data_is_read_by_train_and_eval_but_prep_needs_data_train(artifacts, tmp_path, capsys):
    """A config that trains on `zeray prep`'s output (data.prepared, no data.train) passes the checks of the
    commands that read it, and `zeray prep` refuses it in one line (it prepares data.train)."""
    from zeray.cli import main

    (tmp_path / "data").mkdir()
    path = write_config(
        tmp_path / "prepared.yaml",
        name="p",
        storage=str(tmp_path / "runs"),
        data={"prepared": str(tmp_path / "data")},
        model={"name_or_path": artifacts["model"]},
    )
    for prep_only in (False, True):  # train; eval
        assert load_config(path, [], prep_only=prep_only).data.prepared == str(tmp_path / "data")
    capsys.readouterr()
    assert main(["prep", path]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: data.train is not set in {path}: `zeray prep` prepares")
    assert not (tmp_path / "runs" / "p").exists()  # nor its log folder
