"""The `data:` section of a run config."""

from typing import Annotated, Literal

from pydantic import Field, model_validator

from core.section import Section
from pipelines.formats import FORMATS


class SplitConfig(Section):
    val: float = Field(0.1, ge=0.0, lt=1.0)
    """Fraction of records held out for validation (decided by a stable hash of each record)."""
    test: float = Field(0.1, ge=0.0, lt=1.0)
    """Fraction of records held out for the final test; never used in training."""
    seed: int = 42
    """Salt of the split hash: change it to draw a different split."""

    @model_validator(mode="after")
    def _leaves_training_data(self):
        if self.val + self.test >= 1.0:
            raise ValueError(f"val + test must be below 1.0 so some records train (got {self.val} + {self.test})")
        return self


FORMAT = Literal[("auto", *FORMATS)]


class SourceConfig(Section):
    """One source of a data mixture (`data.train` as a list)."""

    path: str
    """Its data, as `data.train` takes it: a file, a glob, a directory, or a saved Hugging Face dataset."""
    format: FORMAT | None = None
    """Its record format (`data.format` when not set)."""
    weight: float = Field(1.0, gt=0, le=1e6)
    """Its share of the training records each epoch draws, relative to the other sources' weights."""


class DataConfig(Section):
    train: str | Annotated[list[SourceConfig], Field(min_length=1)] | None = None
    """Conversation data: a .jsonl/.json/.parquet/.csv file (.gz/.zst too), a glob, a directory of them, or a
    directory saved by Hugging Face `datasets` (`save_to_disk`; of a DatasetDict, its `train` split). Or a mixture:
    a list of `{path, format, weight}`, each source's training records drawn in proportion to its weight (an epoch
    draws as many records as all sources hold; a source below its share is repeated, one above it sampled)."""
    prepared: str | None = None
    """The data/ folder `zeray prep` wrote (a path or a URI such as s3://bucket/runs/x/data): `zeray train` reads
    its Parquet splits instead of running the pipeline."""
    format: FORMAT = "auto"
    """Record format; `auto` detects it from the first valid record and says which it chose."""
    split: SplitConfig = Field(default_factory=SplitConfig)
    """How records are divided into train/val/test."""
    dedup: bool = True
    """Reject exact duplicate conversations (after cleaning) across the whole dataset, keeping the first."""
    max_length: int = Field(512, ge=8, le=1_048_576)
    """Longest tokenized sequence (a packed sequence included)."""
    overlong: Literal["truncate", "reject"] = "truncate"
    """A conversation over `max_length` tokens: `truncate` cuts it after the last assistant reply that fits (plain
    text at `max_length`; one whose first reply does not fit is rejected as `too_long`); `reject` rejects it."""
    packing: bool = True
    """Pack several conversations into each sequence of up to `max_length` tokens (positions restart per
    conversation, attention and loss stay within it); off: one conversation per row, padded per batch."""
    loss_on: Literal["assistant", "last", "all"] = "assistant"
    """Which tokens carry loss: every `assistant` reply (default), only the `last` reply, or `all` tokens."""
    tokenizer_actors: Annotated[int, Field(ge=1)] | Literal["auto"] = Field("auto", union_mode="left_to_right")
    """Actors in the Ray Data pool that renders and tokenizes (one tokenizer loaded per actor). `auto`: the
    cluster's CPUs less one (on one machine, at most its cores); a larger number is capped to that, since reading
    and parsing need a CPU of their own or the pipeline would starve itself."""
    batch_size: int = Field(256, ge=1, le=1_000_000)
    """Records per Ray Data batch in the parse and tokenize stages."""

    @model_validator(mode="after")
    def _distinct_sources(self):
        if isinstance(self.train, list):
            paths = [source.path for source in self.train]
            repeated = sorted({p for p in paths if paths.count(p) > 1})
            if repeated:
                raise ValueError(f"a source may appear once in data.train; {repeated[0]} is given twice")
        return self

    def sources(self) -> list[SourceConfig]:
        """The training sources: the mixture's, or `train` as the one source."""
        if isinstance(self.train, list):
            return self.train
        return [SourceConfig(path=self.train)] if self.train else []

    def source_key(self, index: int) -> str:
        """How errors name a source's path."""
        return f"data.train[{index}].path" if isinstance(self.train, list) else "data.train"
