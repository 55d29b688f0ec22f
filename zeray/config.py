"""The run config: YAML with one typed section per package, `k=v` overrides, validated at load.

Every problem a user can cause here becomes a `UserError` with one line that names the key (or file)
and what would be valid, e.g. `unknown key train.lrr in configs/demo.yaml (did you mean train.lr?)`.
"""

import os
from pathlib import Path
from typing import Any, ClassVar

import yaml
from pydantic import Field, field_validator

from cluster.config import ClusterConfig
from core.errors import UserError
from core.fs import check_uri, is_uri, join
from core.keys import set_dotted
from core.section import Section, validated
from pipelines.config import DataConfig
from trainers.config import ModelConfig, TrainConfig
from tuning.config import TuneConfig


class RunConfig(Section):
    name: str = Field("run", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=128)
    """Run name; results go to <storage>/<name>/."""
    storage: str = "./runs"
    """Where runs are written: a local directory, or a URI pyarrow understands (s3://bucket/runs, gs://, abfs://,
    hdfs://) with credentials and endpoint from the environment."""
    data: DataConfig = Field(default_factory=DataConfig)
    """Input data and preprocessing."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    """The model to fine-tune."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """Training on Ray Train with DeepSpeed."""
    tune: TuneConfig = Field(default_factory=TuneConfig)
    """Hyperparameter search with Ray Tune."""
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    """Where it runs."""

    # values that may carry credentials: not echoed in errors
    hidden_keys: ClassVar[frozenset[str]] = frozenset(
        {"train.mlflow_uri", "cluster.address", "storage", "data.prepared"}
    )

    @field_validator("storage")
    @classmethod
    def _plain_uri(cls, value):
        if is_uri(value) and (problem := check_uri(value)):
            raise ValueError(problem)
        return value

    @property
    def run_dir(self) -> str:
        """<storage>/<name>: a local path or a URI."""
        return join(self.storage, self.name)


def load_config(path: str, overrides: list[str] = (), check_paths: bool = True, prep_only: bool = False) -> RunConfig:
    """Read `path`, apply `k=v` overrides, validate, and make local paths absolute.

    Relative paths are taken from the current directory (as a shell user expects), and made absolute here
    because Ray workers run in other directories.
    """
    raw = _read_yaml(path)
    for item in overrides:
        _apply_override(raw, item)
    cfg = validated(RunConfig, raw, path, overrides)
    cfg.storage = _absolute(cfg.storage)
    if isinstance(cfg.data.train, list):
        for source in cfg.data.train:
            source.path = _absolute(source.path)
    elif cfg.data.train:
        cfg.data.train = _absolute(cfg.data.train)
    cfg.data.prepared = _absolute(cfg.data.prepared) if cfg.data.prepared else None
    if _looks_like_path(cfg.model.name_or_path):
        cfg.model.name_or_path = _absolute(cfg.model.name_or_path)
    if cfg.train.deepspeed:
        cfg.train.deepspeed = _absolute(cfg.train.deepspeed)
    if check_paths:
        check_local_paths(cfg, path, prep_only)
    return cfg


def check_local_paths(cfg: RunConfig, source: str, prep_only: bool = False) -> None:
    """A missing data file or model directory is a user error, found before any Ray work starts."""
    if cfg.data.prepared and not (prep_only and cfg.data.train):  # train and eval read it, prep reads data.train
        if not is_uri(cfg.data.prepared) and not os.path.isdir(cfg.data.prepared):
            raise UserError(f"data.prepared: {cfg.data.prepared} does not exist (write it with `zeray prep`)")
    elif not cfg.data.train:
        raise UserError(f"data.train is not set in {source}: give a .jsonl file, a glob or a directory")
    else:
        from pipelines.sources import source_files  # local: keeps config import light

        source_files(cfg.data, announce=False)  # raises UserError naming the key and path; the pipeline announces
    if cfg.train.deepspeed and not prep_only:
        from trainers.deepspeed_config import load_user_deepspeed

        load_user_deepspeed(cfg.train.deepspeed)  # raises UserError naming the file
    model = cfg.model.name_or_path
    if model.lower().endswith(".gguf"):
        raise UserError(
            f"model.name_or_path: {model} is a GGUF file; zeray trains Hugging Face model folders: convert it once "
            f"with `zeray import-gguf {model} --out DIR` and point model.name_or_path at DIR"
        )
    if _looks_like_path(model):
        if not os.path.isdir(model):
            raise UserError(
                f"model.name_or_path: directory {model} does not exist "
                "(build the demo model with `zeray init-model`, or point at a Hugging Face model dir)"
            )
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise UserError(f"model.name_or_path: {model} has no config.json; expected a Hugging Face model directory")
        from trainers.remote_code import check_remote_code

        check_remote_code(model, cfg.model.trust_remote_code, "model.name_or_path", "model.trust_remote_code: true")


def parse_value(text: str) -> Any:
    """A command-line value, read as YAML (so `true`, `3`, `[1, 2]`, `null` work) with `1e-4` read as a float."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads "1e-4" as a string
        except ValueError:
            pass
    return value


def _read_yaml(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"config file {path} is a directory; give a YAML file") from None
    except UnicodeDecodeError:
        raise UserError(f"config file {path} is not UTF-8 text") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise UserError(f"config file {path}{where}: {problem}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"config file {path} must be a YAML mapping of sections (name, data, model, train, ...)")
    return raw


def _apply_override(raw: dict, item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key or any(not part or not part.isprintable() or part != part.strip() for part in key.split(".")):
        raise UserError(f"override {item!r} must look like section.key=value, e.g. train.lr=3e-4")
    set_dotted(raw, key, parse_value(text), item)


def _looks_like_path(value: str) -> bool:
    """Anything that exists or starts like a path is a path; other names are hub ids (`org/name`)."""
    return value.startswith((".", "/", "~")) or os.path.exists(value)


def _absolute(value: str) -> str:
    if is_uri(value):
        return value
    return str(Path(os.path.expanduser(value)).absolute())
