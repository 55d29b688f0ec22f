"""The search space: `tune.space` (dotted config key -> distribution) to Ray Tune domains, checked against the
config before any trial starts, and a trial's sampled values back to a validated run config."""

from typing import Any

from ray import tune

from core.errors import UserError
from core.keys import flatten
from core.section import Section, with_values
from tuning.schedulers import SCHEDULERS

KINDS = ("uniform", "loguniform", "randint", "choice", "grid")
# keys a trial may not change: where the campaign lives and how it runs
FIXED = ("name", "storage", "tune", "cluster")
# what PBT may perturb: values that change how training goes on from a checkpoint, not what the checkpoint means
PBT_MUTABLE = ("train.lr", "train.weight_decay", "train.grad_clip")


def parse_space(cfg: Section) -> dict[str, Any]:
    """`tune.space` as a nested Ray Tune param_space (`{"train": {"lr": tune.loguniform(...)}}`), every key and
    every end of every range validated against the config."""
    t = cfg.tune
    if not t.space:
        raise UserError(
            "tune.space is empty: give at least one key to search, e.g. train.lr: {loguniform: [1.0e-5, 1.0e-3]}"
        )
    space: dict[str, Any] = {}
    for key, spec in t.space.items():
        where = f"tune.space.{key}"
        if key.split(".")[0] in FIXED:
            raise UserError(f"{where}: a trial cannot change {key.split('.')[0]}; search data.*, model.* or train.*")
        if len(spec) != 1 or next(iter(spec)) not in KINDS:
            raise UserError(f"{where}: give exactly one of {', '.join(KINDS)} (got {sorted(spec)})")
        kind, args = next(iter(spec.items()))
        domain = _domain(where, kind, args)
        for value in args:  # both ends of a range, or every listed value
            with_values(cfg, {key: value}, where)  # an unknown key or a value the config refuses: say so now
        if t.search == "grid" and kind not in ("choice", "grid"):
            raise UserError(f"{where}: search: grid needs choice or grid values, not {kind}")
        if t.search == "optuna" and kind == "grid":
            raise UserError(f"{where}: search: optuna samples its own values; use choice instead of grid")
        if SCHEDULERS[t.scheduler].clones_checkpoints and key not in PBT_MUTABLE:
            raise UserError(
                f"{where}: PBT continues one trial from another's checkpoint, so it can only perturb "
                f"{', '.join(PBT_MUTABLE)}"
            )
        if t.search == "grid":
            domain = tune.grid_search(list(args))
        node = space
        for part in key.split(".")[:-1]:
            node = node.setdefault(part, {})
        node[key.split(".")[-1]] = domain
    return space


def pbt_mutations(cfg: Section) -> dict[str, Any]:
    """What PBT resamples or perturbs when a trial exploits another: listed values stay lists (PBT moves to a
    neighbour), ranges stay Tune domains (PBT scales by 0.8 / 1.2 or resamples); nested like the param_space."""
    mutations: dict[str, Any] = {}
    for key, spec in cfg.tune.space.items():
        kind, args = next(iter(spec.items()))
        node = mutations
        for part in key.split(".")[:-1]:
            node = node.setdefault(part, {})
        node[key.split(".")[-1]] = list(args) if kind in ("choice", "grid") else _domain(key, kind, args)
    return mutations


def _domain(where: str, kind: str, args: Any):
    if kind in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise UserError(f"{where}: {kind} needs a non-empty list of values")
        return tune.choice(args) if kind == "choice" else tune.grid_search(args)
    if not (isinstance(args, list) and len(args) == 2 and all(_number(a) for a in args)):
        raise UserError(f"{where}: {kind} needs [low, high] (two numbers)")
    lo, hi = args
    if not lo < hi:
        raise UserError(f"{where}: {kind} needs low < high (got {lo}, {hi})")
    if kind == "uniform":
        return tune.uniform(float(lo), float(hi))
    if kind == "loguniform":
        if lo <= 0:
            raise UserError(f"{where}: loguniform needs low > 0 (got {lo})")
        return tune.loguniform(float(lo), float(hi))
    if not all(isinstance(a, int) for a in args):
        raise UserError(f"{where}: randint needs two integers (got {lo}, {hi})")
    return tune.randint(lo, hi + 1)  # Tune's upper end is exclusive; ours is included


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def trial_config(base: Section, params: dict) -> Section:
    """The campaign's config with one trial's values applied (validated: a bad value fails that trial, named)."""
    return with_values(base, flatten(params), "tune.space")
