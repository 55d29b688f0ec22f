"""The search space and the campaign's sizing, without running trials."""

import pytest
from ray.tune.search.sample import Categorical, Float, Integer

from core.errors import UserError
from core.keys import flatten
from tuning.config import TuneConfig
from tuning.space import parse_space, pbt_mutations, trial_config
from zeray.config import RunConfig


def config(**tune) -> RunConfig:
    return RunConfig(tune=TuneConfig(**tune))


def test_every_kind_becomes_its_tune_domain_nested_like_the_config():
    space = parse_space(
        config(
            space={
                "train.lr": {"loguniform": [1.0e-5, 1.0e-3]},
                "train.weight_decay": {"uniform": [0.0, 0.1]},
                "train.grad_accum": {"randint": [1, 4]},
                "train.micro_batch_size": {"choice": [2, 4, 8]},
                "data.max_length": {"grid": [128, 256]},
            }
        )
    )
    train = space["train"]
    assert isinstance(train["lr"], Float) and (train["lr"].lower, train["lr"].upper) == (1.0e-5, 1.0e-3)
    assert isinstance(train["weight_decay"], Float) and (train["weight_decay"].lower, train["weight_decay"].upper) == (
        0.0,
        0.1,
    )
    # both ends of randint are included: Tune's upper bound is exclusive
    assert isinstance(train["grad_accum"], Integer) and (train["grad_accum"].lower, train["grad_accum"].upper) == (1, 5)
    assert isinstance(train["micro_batch_size"], Categorical) and train["micro_batch_size"].categories == [2, 4, 8]
    assert space["data"]["max_length"] == {"grid_search": [128, 256]}


def test_a_trial_config_applies_the_sampled_values_and_validates_them():
    base = config(space={"train.lr": {"choice": [1.0e-4]}})
    cfg = trial_config(base, {"train": {"lr": 1.0e-4, "micro_batch_size": 2}})
    assert cfg.train.lr == 1.0e-4 and cfg.train.micro_batch_size == 2
    assert base.train.lr == 2.0e-4  # the campaign's own config is untouched
    assert flatten({"train": {"lr": 1.0, "zero_stage": 3}, "data": {"max_length": 64}}) == {
        "train.lr": 1.0,
        "train.zero_stage": 3,
        "data.max_length": 64,
    }
    with pytest.raises(
        UserError,
        match=r"invalid value for train.zero_stage in tune.space \(override "
        r"train.zero_stage=5\)",
    ):
        trial_config(base, {"train": {"zero_stage": 5}})


@pytest.mark.parametrize(
    "space, tune, message",
    [
        ({}, {}, "tune.space is empty"),
        ({"train.lrr": {"choice": [1.0]}}, {}, r"unknown key train.lrr in tune.space.train.lrr.*did you mean train.lr"),
        ({"train.lr": {"choice": [1.0e-4, -1.0]}}, {}, r"invalid value for train.lr in tune.space.train.lr"),
        ({"train.lr": {"loguniform": [0.0, 1.0]}}, {}, r"loguniform needs low > 0"),
        ({"train.lr": {"uniform": [1.0, 0.5]}}, {}, r"uniform needs low < high"),
        ({"train.lr": {"uniform": [1.0]}}, {}, r"uniform needs \[low, high\]"),
        ({"train.grad_accum": {"randint": [1.5, 4]}}, {}, r"randint needs two integers"),
        ({"train.lr": {"choice": []}}, {}, r"choice needs a non-empty list"),
        ({"train.lr": {"normal": [0, 1]}}, {}, r"give exactly one of uniform, loguniform, randint, choice, grid"),
        ({"train.lr": {"choice": [1.0], "grid": [2.0]}}, {}, r"give exactly one of"),
        ({"storage": {"choice": ["/a", "/b"]}}, {}, r"tune.space.storage: a trial cannot change storage"),
        ({"tune.metric": {"choice": ["eval_loss"]}}, {}, r"a trial cannot change tune"),
        ({"train.lr": {"loguniform": [1.0e-5, 1.0e-3]}}, {"search": "grid"}, r"search: grid needs choice or grid"),
        ({"train.lr": {"grid": [1.0e-5, 1.0e-3]}}, {"search": "optuna"}, r"use choice instead of grid"),
        (
            {"train.micro_batch_size": {"choice": [2, 4]}},
            {"scheduler": "pbt"},
            r"PBT .* can only perturb train.lr, train.weight_decay, train.grad_clip",
        ),
    ],
)
def test_a_bad_space_is_one_line_naming_the_key(space, tune, message):
    with pytest.raises(UserError, match=message):
        parse_space(config(space=space, **tune))


def test_pbt_perturbs_listed_values_as_lists_and_ranges_as_domains():
    cfg = config(
        scheduler="pbt",
        search="grid",
        space={"train.lr": {"grid": [1.0e-3, 1.0e-4]}, "train.weight_decay": {"uniform": [0.0, 0.1]}},
    )
    mutations = pbt_mutations(cfg)
    assert mutations["train"]["lr"] == [1.0e-3, 1.0e-4]
    weight_decay = mutations["train"]["weight_decay"]
    assert isinstance(weight_decay, Float) and (weight_decay.lower, weight_decay.upper) == (0.0, 0.1)


def test_optuna_cannot_drive_pbt():
    with pytest.raises(ValueError, match="optuna cannot drive tune.scheduler: pbt"):
        TuneConfig(search="optuna", scheduler="pbt")


def test_trials_at_once_fit_beside_the_data_pipeline(ray_cluster):
    from tuning.campaign import trials_at_once

    # the test Ray has 4 CPUs; 2 stay with Ray Data
    per_worker = {"CPU": 1.0}
    assert trials_at_once(config(), per_worker) == 1  # default: 2 workers per trial
    one_worker = RunConfig.model_validate({"train": {"num_workers": 1}})
    assert trials_at_once(one_worker, per_worker) == 2
    capped = RunConfig.model_validate({"train": {"num_workers": 1}, "tune": {"max_concurrent": 5}})
    assert trials_at_once(capped, per_worker) == 2
    fewer = RunConfig.model_validate({"train": {"num_workers": 1}, "tune": {"max_concurrent": 1}})
    assert trials_at_once(fewer, per_worker) == 1
