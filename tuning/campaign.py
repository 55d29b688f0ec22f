"""`zeray tune`: a Ray Tune campaign whose trials are the training run of `zeray train` with the trial's values.

The data is prepared once for the whole campaign (unless the space searches `data.*`); as many trials run at once
as the cluster holds beside the data pipeline; each trial keeps only its best checkpoint; at the end the best
trial's model is exported and the campaign written down (see tuning.results). `--resume` continues a campaign
that was interrupted or whose driver died, through `Tuner.restore`.
"""

import json

from ray import tune

from cluster.local import PlacementWatchdog, capacity, placement_timeout, python_sigint
from cluster.resources import worker_resources
from cluster.storage import remove_orphaned_staging
from core.console import say
from core.errors import UserError
from core.fs import exists, is_local, join, resolve, write_bytes
from core.section import with_values
from pipelines.prep import REPORT, load_prepared, prepare
from trainers.run import check_same_run
from trainers.steps import make_plan
from tuning.results import write_results
from tuning.schedulers import SCHEDULERS
from tuning.space import parse_space
from tuning.trial import FirstClaim, run_trial

TUNE_DIR = "tune"
CAMPAIGN_CONFIG = "campaign.json"
TRIAL_DRIVER_CPU = 0.01  # a trial's own process only waits on its TorchTrainer: it must not hold a whole CPU
PBT_TUNE_CHECKPOINTS = 4  # per trial, kept while the campaign runs so PBT can clone them


def tune_dir(cfg) -> str:
    return join(cfg.run_dir, TUNE_DIR)


def check_campaign(cfg, resume: bool) -> None:
    """Refuse to start over a campaign the storage holds, or to resume one it does not hold."""
    out = tune_dir(cfg)
    fs, out_path = resolve(out, "storage")
    restorable = tune.Tuner.can_restore(out_path, storage_filesystem=None if is_local(fs) else fs)
    if resume and not restorable:
        raise UserError(f"--resume: {out} holds no campaign to resume; run without --resume to start it")
    if restorable and not resume:
        raise UserError(f"{out} already holds campaign {cfg.name}; add --resume to continue it, or change `name`")


def run_campaign(cfg, resume: bool = False) -> dict:
    """Run (or, with `resume`, continue) the campaign `cfg.tune` describes; returns what best.json holds."""
    check_campaign(cfg, resume)
    out = tune_dir(cfg)  # a local path or a URI: Tune keeps its state there, and the trials their runs
    fs, out_path = resolve(out, "storage")
    tune_fs = None if is_local(fs) else fs  # Tune's own handling of local paths, as without a filesystem
    campaign_file = join(out, CAMPAIGN_CONFIG)
    if resume:
        check_same_run(cfg, campaign_file, sections=("data", "model", "train", "tune"))
    space = parse_space(cfg)
    _, per_worker = worker_resources(cfg)  # one trial must fit the cluster: else a clean error here
    concurrent = trials_at_once(cfg, per_worker)
    write_bytes(fs, f"{out_path}/{CAMPAIGN_CONFIG}", json.dumps(cfg.model_dump(mode="json"), indent=2).encode())

    base = with_values(cfg, {"train.keep_checkpoints": 1}, "tune")  # disk: a trial keeps its best checkpoint
    total_steps, prepared = None, None
    if not any(key.startswith("data.") for key in cfg.tune.space):
        # one preprocessing for every trial, read into the object store once: trials share its blocks
        base = with_values(base, {"data.prepared": prepare_once(cfg, out)}, "tune")
        prepared = load_prepared(base.data.prepared)
        report = prepared[1]
        t = cfg.train
        total_steps = make_plan(
            report["rows"]["train"], t.num_workers, t.micro_batch_size, t.grad_accum, t.epochs, t.max_steps
        )["total_steps"]

    t = cfg.tune
    pbt = SCHEDULERS[t.scheduler].clones_checkpoints
    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial,
            base=base,
            campaign_dir=out,
            pbt=pbt,
            prepared=prepared,
            base_eval=FirstClaim.remote() if prepared else None,
        ),
        {"CPU": TRIAL_DRIVER_CPU},
    )
    if resume:
        say(
            f"resuming campaign {cfg.name} in {out}: finished trials are kept, unfinished ones continue from "
            "their checkpoints",
        )
        tuner = tune.Tuner.restore(
            out_path,
            trainable,
            resume_unfinished=True,
            resume_errored=False,
            restart_errored=False,
            storage_filesystem=tune_fs,
        )
    else:
        grid = t.search == "grid"
        say(
            f"campaign {cfg.name}: "
            + ("every combination of the grid" if grid else f"{t.num_samples} trials")
            + f", {t.search} search, {t.scheduler} scheduler, {concurrent} at once, each "
            f"{cfg.train.num_workers} worker(s) x {_resources(per_worker)}; results in {out}",
        )
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                metric=t.metric,
                mode=t.mode,
                num_samples=1 if grid else t.num_samples,
                search_alg=_search(cfg),
                scheduler=SCHEDULERS[t.scheduler].build(cfg, total_steps),
                max_concurrent_trials=concurrent,
            ),
            run_config=tune.RunConfig(
                name=TUNE_DIR,
                storage_path=resolve(cfg.run_dir, "storage")[1],
                storage_filesystem=tune_fs,
                # a trial that fails has bad settings (or ran out of memory): record why and go on; worker
                # crashes are retried inside the trial by Ray Train (train.max_failures)
                failure_config=tune.FailureConfig(max_failures=0),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=PBT_TUNE_CHECKPOINTS if pbt else None),
                verbose=1,
            ),
        )
    interrupted = f"continue it with `zeray tune <config> --resume` (its state is in {out})"
    # never hang on resources: a trial's workers that stay unplaced stop the campaign (saved, resumable) with why;
    # Tune's handler saves the campaign on the first SIGINT and skips that on the next: leave it a minute
    with python_sigint(), PlacementWatchdog(placement_timeout(cfg.cluster), resend_s=60) as watchdog:
        try:
            grid_result = tuner.fit()
        except KeyboardInterrupt:
            grid_result = None
    unfinished = len(grid_result) - grid_result.num_terminated - grid_result.num_errors if grid_result else 1
    if watchdog.message:
        raise UserError(f"{watchdog.message}; campaign {cfg.name} stopped: {interrupted}")
    if unfinished:  # Ctrl-C: Tune stops and saves the campaign, and returns
        raise UserError(f"campaign {cfg.name} interrupted with {unfinished} trial(s) unfinished: {interrupted}")
    remove_orphaned_staging()  # of trials the scheduler stopped (PBT exploits, ASHA), on this node
    return write_results(cfg, out, grid_result)


def prepare_once(cfg, out: str) -> str:
    """The campaign's data, preprocessed once for all trials (kept across --resume); returns its folder."""
    if cfg.data.prepared:
        return cfg.data.prepared
    data_dir = join(out, "data")
    fs, path = resolve(data_dir, "storage")
    if not exists(fs, f"{path}/{REPORT}"):
        sources = ", ".join(source.path for source in cfg.data.sources())
        say(f"data: preparing {sources} once for every trial, in {data_dir}")
        prepare(
            cfg.data,
            cfg.model.name_or_path,
            data_dir,
            cfg.model.trust_remote_code,
            wait_s=placement_timeout(cfg.cluster),
        )
    return data_dir


def trials_at_once(cfg, per_worker: dict[str, float]) -> int:
    """How many trials the cluster holds at once: every resource a trial's workers need, after the CPUs kept for
    the data pipeline (`cluster.data_cpus`), so that trials can never starve the pipeline that feeds them."""
    have = capacity()
    workers = cfg.train.num_workers
    fits = min(
        int((have.get(name, 0.0) - (cfg.cluster.data_cpus if name == "CPU" else 0.0) + 1e-9) // (amount * workers))
        for name, amount in per_worker.items()
    )
    fits = max(fits, 1)  # worker_resources() has checked that one trial fits
    wanted = cfg.tune.max_concurrent
    if wanted == "auto":
        return fits
    if wanted > fits:
        say(
            f"tune.max_concurrent={wanted} is more than the cluster holds ({fits} trials of {workers} x "
            f"{_resources(per_worker)} beside {cfg.cluster.data_cpus:g} CPU for Ray Data); running {fits} at once",
        )
        return fits
    return wanted


def _search(cfg):
    t = cfg.tune
    if t.search != "optuna":
        return None  # Tune's own random sampling / grid expansion
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(metric=t.metric, mode=t.mode, seed=cfg.train.seed)  # Tune limits it to max_concurrent


def _resources(per_worker: dict[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in sorted(per_worker.items()))
