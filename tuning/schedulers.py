"""The trial schedulers a campaign can use (`tune.scheduler`): a name, how to build Tune's scheduler for a campaign,
and whether it continues trials from other trials' checkpoints (as PBT does: those trials report every checkpoint to
Tune, and start new runs from the checkpoints it hands them). Adding one is a function and a line in SCHEDULERS."""

from dataclasses import dataclass
from typing import Callable


def _fifo(cfg, total_steps: int | None):
    from ray.tune.schedulers import FIFOScheduler

    return FIFOScheduler()


def _asha(cfg, total_steps: int | None):
    from ray.tune.schedulers import ASHAScheduler

    t = cfg.tune
    # rungs at grace x reduction_factor^k optimizer steps; a trial is judged by its evaluations
    # (a trial that reaches its last step is never stopped there: its final checkpoint is still to come)
    return ASHAScheduler(
        time_attr="step",
        max_t=total_steps or 10**9,
        grace_period=t.grace_period or cfg.train.eval_every,
        reduction_factor=t.reduction_factor,
        stop_last_trials=False,
    )


def _pbt(cfg, total_steps: int | None):
    from ray.tune.schedulers import PopulationBasedTraining

    from tuning.space import pbt_mutations

    # PBT acts at checkpoints (only those can be cloned): every train.checkpoint_every steps
    return PopulationBasedTraining(
        time_attr="step",
        perturbation_interval=cfg.train.checkpoint_every,
        hyperparam_mutations=pbt_mutations(cfg),
        quantile_fraction=0.5,
    )


@dataclass(frozen=True)
class Scheduler:
    build: Callable  # (run config, the campaign's optimizer steps per trial or None) -> a Tune TrialScheduler
    clones_checkpoints: bool = False


SCHEDULERS = {
    "fifo": Scheduler(_fifo),  # every trial to its end
    "asha": Scheduler(_asha),  # weak trials stopped early
    "pbt": Scheduler(_pbt, clones_checkpoints=True),  # weak trials continue from strong ones' checkpoints
}
