"""Connecting to Ray: an existing cluster when an address is given, else an embedded local Ray sized so the
data pipeline and the training workers cannot starve each other, stopped again at the end.

Why the sizing: on a 2-CPU Ray, two training workers of 1 CPU each leave Ray Data no CPU budget and the run
hangs forever at "backpressured: ResourceBudget". Logical CPUs are scheduling slots, not cores, so the embedded
Ray gets the workers' CPUs plus `cluster.data_cpus` for the pipeline, however many cores the machine has.
"""

import json
import math
import os
import signal
import socket
import threading
import time
from contextlib import contextmanager

import ray

from cluster.config import ClusterConfig
from cluster.console import relay_worker_output
from core.errors import UserError

PREEMPTION_WATCHER = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def embedded_cpus(cluster: ClusterConfig, train_cpus: float) -> int:
    """Logical CPUs for the embedded Ray: training workers + the data pipeline's share, at least the cores."""
    if cluster.num_cpus:
        return cluster.num_cpus
    return max(os.cpu_count() or 1, math.ceil(train_cpus + cluster.data_cpus))


def embedded_system_config(num_cpus: int) -> dict:
    """Settings of the embedded Ray: it keeps up to twice its CPUs in idle worker processes. Ray's default keeps
    as many as it has CPUs and ends the rest after a second idle, but the pipeline's stages take turns on the
    same CPUs with different workers (read and parse tasks, the sort's tasks with their own runtime env, the
    tokenizer actors), and each worker started again costs about a CPU-second of imports: on 2 cores, 40k short
    conversations took 5.9 s instead of 4.6 s."""
    return {"num_workers_soft_limit": 2 * num_cpus}


def init_embedded(num_cpus: int, dashboard_host: str) -> None:
    """Start a Ray of its own on this machine, even beside a `ray start` here (Ray would join that), whose
    processes know its address. Ray's internal actors that look their cluster up without RAY_ADDRESS (Ray Train's
    placement-group cleaner) read the address file of the latest `ray start` on the machine, or give up when they
    find several Rays: the cleaner would take that other cluster's word that the run's controller is gone and
    remove the placement group its workers run in. So RAY_ADDRESS, with the GCS port it names (Ray's
    RAY_GCS_SERVER_PORT), is in the environment the embedded Ray's processes start with, and only theirs."""
    # one machine, which no autoscaler drains: Ray Train's preemption watcher (an actor process per worker group,
    # about a CPU-second to start) would watch for a node drain that cannot come
    os.environ.setdefault(PREEMPTION_WATCHER, "0")
    with socket.socket() as probe:  # a free port (Ray would pick one itself, after its processes have started)
        probe.bind(("", 0))
        port = probe.getsockname()[1]
    own = {"RAY_GCS_SERVER_PORT": str(port), "RAY_ADDRESS": f"{ray.util.get_node_ip_address()}:{port}"}
    before = {key: os.environ.get(key) for key in own}
    os.environ.update(own)
    try:
        ray.init(
            address="local",  # (RAY_ADDRESS is not read for "local")
            num_cpus=num_cpus,
            dashboard_host=dashboard_host,
            log_to_driver=True,
            configure_logging=True,
            logging_level="WARNING",
            _system_config=embedded_system_config(num_cpus),
        )
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextmanager
def ray_session(cluster: ClusterConfig, train_cpus: float):
    """Ray for the duration of one command: reuse one already initialised (tests), connect, or embed."""
    if ray.is_initialized():
        yield "existing"
        return
    address = cluster_address(cluster)
    if address:
        ray.init(address=address, log_to_driver=True)
        relay_worker_output()
        where = f"Ray cluster at {address}"
    else:
        num_cpus = embedded_cpus(cluster, train_cpus)
        init_embedded(num_cpus, cluster.dashboard_host)
        relay_worker_output()
        where = f"embedded local Ray ({num_cpus} logical CPUs)"
    try:
        yield where
    finally:
        ray.shutdown()


def cluster_address(cluster: ClusterConfig) -> str | None:
    """The Ray to connect to: the job's own cluster inside a Ray Job, else `cluster.address`, else RAY_ADDRESS;
    None for an embedded Ray."""
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    if RAY_JOB_CONFIG_JSON_ENV_VAR in os.environ:  # we are a Ray Job's driver: Ray set RAY_ADDRESS for us
        return os.environ.get("RAY_ADDRESS") or "auto"
    address = cluster.address or os.environ.get("RAY_ADDRESS")
    if address and address.startswith(("http://", "https://")):
        raise UserError(
            f"{address} is a Ray dashboard, where jobs are submitted: run there with "
            "`zeray submit CONFIG --address ...`, or drive from here with ray://<head>:10001"
        )
    return address


def resource_fit(workers: int, per_worker: dict[str, float], data_cpus: float) -> dict:
    """What the run asks for (workers + Ray Data's CPUs) against what the cluster has now and can grow to."""
    need = {name: amount * workers + (data_cpus if name == "CPU" else 0) for name, amount in per_worker.items()}
    now = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
    most = autoscaler_maximum()
    if most:
        most = {k: v for k, v in most.items() if k in ("CPU", "GPU")}

    def holds(have):
        return all(amount <= have.get(name, 0.0) + 1e-9 for name, amount in need.items())

    # an autoscaler of unknown reach may hold it: the placement watchdog decides then
    fits = holds(most) if most else (most == {} or holds(now))
    return {"need": need, "now": now, "most": most, "fits_now": holds(now), "fits": fits}


def describe_fit(workers: int, per_worker: dict[str, float], data_cpus: float, minimum: bool = False) -> str:
    """One line for `zeray plan`: the request, the cluster now and at the autoscaler's maximum, the verdict
    (`minimum`: of an elastic run's fewest workers)."""
    fit = resource_fit(workers, per_worker, data_cpus)
    verdict = (
        "fits now"
        if fit["fits_now"]
        else "does not fit"
        if not fit["fits"]
        else "fits once the autoscaler adds nodes"
        if fit["most"]
        else "fits only if the autoscaler adds nodes"
    )
    return (
        f"cluster: {'at its minimum ' if minimum else ''}the run needs {_fmt(fit['need'])} "
        f"({workers} workers x {_fmt(per_worker)} + "
        f"{data_cpus:g} CPU for Ray Data); the cluster has {_fmt(fit['now'])} now"
        + (
            f", up to {_fmt(fit['most'])} with its autoscaler"
            if fit["most"]
            else ", and an autoscaler that does not say how far it grows"
            if fit["most"] == {}
            else ""
        )
        + f": {verdict}"
    )


def check_fits(workers: int, per_worker: dict[str, float], data_cpus: float) -> None:
    """Fail at once, naming both sides, when the request exceeds everything the cluster has and can grow to (its
    autoscaler's maximum). Requests it can hold only later are left to `PlacementWatchdog`."""
    fit = resource_fit(workers, per_worker, data_cpus)
    if fit["fits"]:
        return
    have = fit["most"] or fit["now"]
    for name, need in fit["need"].items():
        if need > have.get(name, 0.0) + 1e-9:
            raise UserError(
                f"train.num_workers={workers} needs {_fmt({name: need})} "
                f"({workers} x {_fmt(per_worker)}"
                + (f" + {data_cpus:g} CPU for Ray Data" if name == "CPU" else "")
                + f") but the cluster has {_fmt(have)}"
                + (" at its autoscaler's maximum" if fit["most"] else "")
                + "; lower train.num_workers or train.cpus_per_worker, or raise cluster.num_cpus"
            )


FIXED_PLACEMENT_TIMEOUT_S = 120.0
AUTOSCALING_PLACEMENT_TIMEOUT_S = 900.0


def placement_timeout(cluster: ClusterConfig) -> float:
    """`cluster.placement_timeout_s`, or a default that leaves an autoscaler time to bring nodes up."""
    if cluster.placement_timeout_s:
        return cluster.placement_timeout_s
    return AUTOSCALING_PLACEMENT_TIMEOUT_S if autoscaler_maximum() is not None else FIXED_PLACEMENT_TIMEOUT_S


@contextmanager
def python_sigint():
    """Python's own Ctrl-C (KeyboardInterrupt) for the block, and the caller's handler back after it: Ray Train
    leaves its handler installed after every fit, Tune after a campaign, and a handler left behind may swallow
    the watchdog's interrupt."""
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, handler)


def fit_or_explain(trainer, timeout_s: float, elastic_min: tuple[int, dict] | None = None):
    """`trainer.fit()`, but a worker group that cannot be placed becomes a UserError saying why, not a hang.

    The watchdog interrupts the main thread, so it only watches a fit that runs there (a command); a fit inside a
    Tune trial runs in Tune's thread, and the campaign watches for placement itself. During the fit, Ray Train's
    own SIGINT handler aborts its controller (and the pending group) and exits; whatever that surfaces as, the
    watchdog's explanation replaces it. `elastic_min`: (min workers, resources per worker) of an elastic run, which
    waits with no group at all while fewer than min fit."""
    if threading.current_thread() is not threading.main_thread():
        with announced(elastic_min):  # a ray:// command's task: the client watches
            return trainer.fit()
    with python_sigint(), PlacementWatchdog(timeout_s, elastic_min=elastic_min) as watchdog:
        try:
            return trainer.fit()
        except BaseException:
            if watchdog.message:
                raise UserError(watchdog.message) from None
            raise


RETRY_GAP_S = 3.0  # a moment without a pending group that is only a retry between two of them
_KV_NAMESPACE = "zeray"


def _elastic_key(job: str) -> str:
    return f"elastic-fit-{job}"


@contextmanager
def announced(elastic_min: tuple[int, dict] | None):
    """While an elastic fit runs where no watchdog can interrupt it (a ray:// command's task, off its process's
    main thread), its minimum sits in the GCS under its job: the client that started the command watches from
    there (`PlacementWatchdog(from_job=True)`) and learns both that the fit began and what it needs."""
    if not elastic_min:
        yield
        return
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_put

    key = _elastic_key(ray.get_runtime_context().get_job_id())
    _internal_kv_put(key, json.dumps(elastic_min), namespace=_KV_NAMESPACE)
    try:
        yield
    finally:
        _internal_kv_del(key, namespace=_KV_NAMESPACE)


def _announced_minimum(job: str) -> tuple[int, dict] | None:
    from ray.experimental.internal_kv import _internal_kv_get

    value = _internal_kv_get(_elastic_key(job), namespace=_KV_NAMESPACE)
    if not value:
        return None
    workers, per_worker = json.loads(value)
    return workers, per_worker


class PlacementWatchdog:
    """Never hang on resources: if a placement group of this job (not another job's on a shared cluster) stays
    pending past the timeout, interrupt the command and explain what was asked for and what the cluster has.

    The interrupt is SIGINT to the main thread, repeated every `resend_s` until the command leaves the watched
    block: Ray Train's handler asks its controller to abort at the first and exits at the third. A controller
    waiting for its group takes the abort only when that wait ends (60 s), so the third comes soon.

    An elastic run (`elastic_min`: its min workers and each one's resources) asks for no group until min workers
    fit: there, no group of this job at all for the timeout is what a hang looks like. `from_job`: the job's
    elastic fit runs elsewhere (a ray:// command's task) and announces its minimum while it runs (`announced`)."""

    def __init__(
        self,
        timeout_s: float,
        poll_s: float = 1.0,
        resend_s: float = 3.0,
        elastic_min: tuple[int, dict] | None = None,
        from_job: bool = False,
    ):
        self.elastic_min = elastic_min
        self.from_job = from_job
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self.resend_s = resend_s
        self.message: str | None = None
        self.error: str | None = None  # the last failure to read the placement groups, for a stuck watchdog
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="zeray-placement-watchdog", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        job = ray.get_runtime_context().get_job_id()  # a placement group's id ends with its job's
        # since when some group of this job has been pending without a break: Ray Train gives up on a group after
        # RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (60 s) and asks for a new one at once, for ever, so no single group
        # stays pending past a longer timeout while the run waits
        pending_since: float | None = None
        last_pending = groupless_since = time.monotonic()
        while self.message is None and not self._stop.wait(self.poll_s):
            try:
                table = ray.util.placement_group_table()
            except Exception as exc:  # the GCS going away at shutdown is not our business
                self.error = repr(exc)
                continue
            now = time.monotonic()
            if self.from_job:
                try:
                    minimum = _announced_minimum(job)
                except Exception as exc:
                    self.error = repr(exc)
                    continue
                if minimum and not self.elastic_min:  # the elastic fit began: its clock starts now
                    groupless_since = now
                self.elastic_min = minimum
            if self.elastic_min:
                if any(
                    pg_id.endswith(job) and info.get("state") in ("CREATED", "PENDING", "RESCHEDULING")
                    for pg_id, info in table.items()
                ):
                    groupless_since = now
                elif now - groupless_since > self.timeout_s:
                    self.message = self._explain_elastic()
                    break
            pending = [info for pg_id, info in table.items() if info.get("state") == "PENDING" and pg_id.endswith(job)]
            if pending:
                last_pending = now
                pending_since = pending_since or now
                if now - pending_since > self.timeout_s:
                    self.message = self._explain(pending[0].get("bundles", {}))
            elif now - last_pending > RETRY_GAP_S:
                pending_since = None
        while self.message is not None:
            # a real signal, so a main thread blocked in a wait wakes up too
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            if self._stop.wait(self.resend_s):
                return

    def _explain_elastic(self, asked: str = "") -> str:
        """No group for the timeout, or (`asked`) one that stayed pending: Ray Train's elastic policy sizes its
        group by what the nodes hold, not by what is free, so a minimum that cannot fit may still be asked for."""
        workers, per_worker = self.elastic_min
        have = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
        free = {k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
        return (
            f"the elastic run could not start its workers within cluster.placement_timeout_s={self.timeout_s:g}s: "
            f"it needs at least train.num_workers[0]={workers} x {_fmt(per_worker)}{asked}, the cluster has "
            f"{_fmt(have)} in total and {_fmt(free)} free"
        )

    def _explain(self, bundles: dict) -> str:
        asked = f"asked for {_fmt(_sum_bundles(bundles))} in {len(bundles)} bundles"
        if self.elastic_min:
            return self._explain_elastic(f" ({asked})")
        have = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU", "memory")}
        free = {k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
        return (
            f"the training workers could not be placed within cluster.placement_timeout_s={self.timeout_s:g}s: "
            f"{asked}, the cluster has {_fmt(have)} in total and {_fmt(free)} free"
        )


def capacity() -> dict[str, float]:
    """What the cluster can hold: the autoscaler's maximum when it publishes one, else what it has now."""
    return autoscaler_maximum() or dict(ray.cluster_resources())


def autoscaler_maximum() -> dict[str, float] | None:
    """The resources the cluster can grow to: its autoscaler's published node types (as Ray Train reads them);
    {} when an autoscaler (v1 or v2) runs without publishing them, so the maximum is unknown here; None when
    nothing can grow the cluster."""
    from ray._private.state import state

    try:
        most = state.get_max_resources_from_cluster_config()
    except Exception:
        most = None
    if most:
        return dict(most)
    return {} if _v1_autoscaler() or _v2_autoscaler() else None


def _v2_autoscaler() -> bool:
    """An autoscaler v2 monitor runs (it marks itself in the GCS; a plain Ray's monitor does not)."""
    from ray.autoscaler.v2.utils import is_autoscaler_v2

    try:
        return is_autoscaler_v2(fetch_from_server=True)
    except Exception:
        return False


def _v1_autoscaler() -> bool:
    """An autoscaler v1 monitor with node types of its own. Every Ray runs a monitor, but without an autoscaling
    config it only mirrors the nodes it has, under Ray's read-only type names."""
    import json

    from ray._private import ray_constants
    from ray.autoscaler._private.util import format_readonly_node_type
    from ray.experimental.internal_kv import _internal_kv_get

    try:
        status = json.loads(_internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS) or "{}")
    except Exception:
        return False
    mapping = (status.get("autoscaler_report") or {}).get("node_type_mapping") or {}
    return any(node_type != format_readonly_node_type(node_id) for node_id, node_type in mapping.items())


def _sum_bundles(bundles: dict) -> dict[str, float]:
    total: dict[str, float] = {}
    for bundle in bundles.values():
        for k, v in bundle.items():
            total[k] = total.get(k, 0.0) + v
    return total


def _fmt(resources: dict[str, float]) -> str:
    parts = []
    for k, v in sorted(resources.items()):
        if k == "memory":
            parts.append(f"{v / 2**30:.1f} GiB memory")
        else:
            parts.append(f"{v:g} {k}")
    return ", ".join(parts) or "nothing"
