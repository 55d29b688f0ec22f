"""The `tune:` section of a run config."""

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from core.section import Section
from tuning.schedulers import SCHEDULERS

# what every evaluation reports, so what a scheduler can act on
METRICS = ("eval_loss", "eval_perplexity", "eval_token_accuracy")


class TuneConfig(Section):
    metric: Literal[METRICS] = "eval_loss"
    """Validation metric the campaign optimises (reported at every evaluation, i.e. every `train.eval_every`)."""
    mode: Literal["min", "max"] = "min"
    """Whether smaller or larger `metric` is better."""
    num_samples: int = Field(8, ge=1, le=100_000)
    """Trials to run (`search: grid` runs every combination of the grid once instead)."""
    search: Literal["random", "grid", "optuna"] = "random"
    """Search algorithm over `space`: random sampling, every combination of `choice`/`grid` values, or Optuna TPE."""
    scheduler: Literal[tuple(SCHEDULERS)] = "asha"
    """Run every trial to the end (fifo), stop weak trials early (asha), or population-based training (pbt: at each
    checkpoint a weak trial continues from a strong trial's checkpoint with perturbed `space` values)."""
    max_concurrent: Literal["auto"] | Annotated[int, Field(ge=1)] = "auto"
    """Trials running at once; `auto` fits as many as the cluster's resources allow beside the data pipeline."""
    grace_period: int | None = Field(None, ge=1)
    """ASHA: optimizer steps every trial runs before it may be stopped (default: `train.eval_every`)."""
    reduction_factor: int = Field(2, ge=2, le=100)
    """ASHA: at each rung only the best 1/reduction_factor of trials go on."""
    space: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Dotted config key -> one distribution: `{uniform: [lo, hi]}`, `{loguniform: [lo, hi]}`, `{randint: [lo, hi]}`
    (both ends included), `{choice: [a, b, ...]}` or `{grid: [a, b, ...]}` (every value, in every trial set)."""

    @model_validator(mode="after")
    def _combinations(self):
        if self.search == "optuna" and SCHEDULERS[self.scheduler].clones_checkpoints:
            raise ValueError(
                "tune.search: optuna cannot drive tune.scheduler: pbt (PBT explores by itself); use search: random"
            )
        return self
