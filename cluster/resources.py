"""What a training or evaluation worker asks of the cluster: one home for the sizing that `zeray train`, `eval`,
`plan` and `tune` share."""

from cluster.local import autoscaler_maximum, capacity, check_fits
from core.errors import UserError


def worker_request(cfg) -> tuple[bool, dict[str, float]]:
    """Whether workers get a GPU, and what each reserves (`cfg` is the run config: its train section decides)."""
    gpu = use_gpu(cfg.train.use_gpu, capacity(), autoscaler_maximum() == {})  # an autoscaler may add GPU nodes
    return gpu, {"CPU": cfg.train.cpus_per_worker, **({"GPU": 1.0} if gpu else {})}


def worker_resources(cfg) -> tuple[bool, dict[str, float]]:
    """worker_request(), and a request the cluster can never hold fails here."""
    gpu, per_worker = worker_request(cfg)
    check_fits(cfg.train.min_workers, per_worker, cfg.cluster.data_cpus)  # an elastic run starts with its min
    return gpu, per_worker


def use_gpu(setting, resources: dict, unknown_reach: bool = False) -> bool:
    """`auto`: GPUs if the cluster has or can get some; `true` on a cluster that can never have one is an error
    (unless its autoscaler does not say what it can add)."""
    gpus = resources.get("GPU", 0)
    if setting == "auto":
        return gpus > 0
    if setting and gpus == 0 and not unknown_reach:
        raise UserError(
            "train.use_gpu: true but the Ray cluster has no GPUs (nor can its autoscaler add any); "
            "set train.use_gpu: auto or false"
        )
    return bool(setting)
