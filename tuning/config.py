"""The `tune:` section of a run config."""

from typing import Any, Literal

from pydantic import Field

from zeray.section import Section


class TuneConfig(Section):
    metric: str = "eval_loss"
    """Reported metric the campaign optimises."""
    mode: Literal["min", "max"] = "min"
    """Whether smaller or larger `metric` is better."""
    num_samples: int = Field(8, ge=1)
    """Trials to run."""
    search: Literal["random", "grid", "optuna"] = "random"
    """Search algorithm over `space`."""
    scheduler: Literal["fifo", "asha", "pbt"] = "asha"
    """Trial scheduler: run all to the end, stop weak trials early (ASHA), or population-based training."""
    max_concurrent: Literal["auto"] | int = "auto"
    """Trials running at once; `auto` fits as many as the cluster's resources allow."""
    space: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Dotted config key -> distribution, e.g. `train.lr: {loguniform: [1.0e-5, 1.0e-3]}`."""
