"""Driving a cluster from this machine through Ray Client (`RAY_ADDRESS=ray://<head>:10001 zeray train ...`).

A Ray Client driver cannot run Ray Data's streaming executor (in Ray 2.60 it needs the core worker that only
processes inside the cluster have), so the command's driver part runs as one task on the cluster instead, with
this project as its working_dir — the same upload as `zeray submit`: no virtualenv, outputs or secrets. Its output
streams here and its exit code comes back; paths in the config are the cluster's, as in a job.
"""

import contextlib
import sys
import time

import ray

from core.errors import UserError


def client_address(cfg) -> str | None:
    """The ray:// address a command with this config would connect to, or None (an embedded Ray, a `ray start`
    address, or already inside the cluster)."""
    from cluster.local import cluster_address

    if ray.is_initialized():  # a task on the cluster (or a test's own Ray): run here
        return None
    address = cluster_address(cfg.cluster)
    return address if address and address.startswith("ray://") else None


def run_through_client(command, address: str, argv: list[str], cfg, watch_placement: bool) -> int:
    """`zeray ARGV` as a task on the cluster behind `address`; returns its exit code. With `watch_placement`, a
    worker group of the command that stays unplaced for cluster.placement_timeout_s stops it with the reason."""
    from cluster.local import PlacementWatchdog, placement_timeout, python_sigint
    from cluster.submit import project_root, runtime_env, secrets_in

    root = project_root()
    left_home = secrets_in(root)
    if left_home:
        print(f"not uploaded (look like secrets): {', '.join(left_home)}", flush=True)
    _connect(address, runtime_env(root, cfg.storage, install=False))
    try:
        print(f"zeray {argv[0]}: driving the cluster at {address}; the command runs there", flush=True)
        ref = _command.remote(command, argv)
        # the task runs off its process's main thread, where the placement watchdog cannot interrupt it: watch
        # here (the task's placement groups are this job's, and an elastic fit announces itself under the job) and
        # cancel it with the explanation
        watch = (
            PlacementWatchdog(placement_timeout(cfg.cluster), from_job=True)
            if watch_placement
            else contextlib.nullcontext()
        )
        try:
            with python_sigint(), watch:
                code, error = ray.get(ref)
        except KeyboardInterrupt:
            ray.cancel(ref, force=True)
            if getattr(watch, "message", None):
                raise UserError(watch.message) from None
            print("\nstopped: the command on the cluster was cancelled", file=sys.stderr, flush=True)
            return 130
        # Ray forwards the task's output asynchronously (its log monitor polls the log files every 0.1 s): a
        # moment for the last lines to arrive before the connection closes
        time.sleep(1.0)
    finally:
        ray.shutdown()
    if error is not None:
        raise UserError(error)
    return code


# how the head's proxy says a client's own server died as it started: it saw the exit, or it read the command
# line of the exited process before reaping it (psutil.ZombieProcess raised in start_specific_server)
_SERVER_DIED = ("Starting Ray client server failed", "in start_specific_server")


def _connect(address: str, env: dict, attempts: int = 4, pause_s: float = 5.0) -> None:
    """ray.init through Ray Client, again when the head's per-client server fails to start. That happens when a
    client connects while the head is still deleting the same working_dir package, unpacked for a client that
    just left (its server's `cd` into it fails; ray-project/ray#19792): a moment later the package unpacks anew."""
    for attempt in range(1, attempts + 1):
        try:
            ray.init(address=address, runtime_env=env, log_to_driver=True)
            return
        except ConnectionAbortedError as exc:
            if not any(sign in str(exc) for sign in _SERVER_DIED) or attempt == attempts:
                raise
            print(
                f"the cluster's client server did not start (attempt {attempt} of {attempts}); "
                f"again in {pause_s:.0f} s",
                file=sys.stderr,
                flush=True,
            )
            time.sleep(pause_s)


@ray.remote(num_cpus=0, max_retries=0)
def _command(run, argv: list[str]) -> tuple[int, str | None]:
    """On the cluster: the command's exit code, and its user error (shown where the user is). `run` is the CLI's
    (shipped by reference: the cluster imports it from the uploaded project)."""
    try:
        return run(argv), None
    except UserError as exc:
        return 2, str(exc)
