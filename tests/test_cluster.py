"""Never hang on resources: impossible requests fail at once, unplaceable ones after the timeout, both explained."""

import re
import signal
import time

import pytest

from cluster.config import ClusterConfig
from cluster.local import PlacementWatchdog, check_fits, embedded_cpus, python_sigint
from core.errors import UserError


def test_embedded_ray_leaves_room_for_the_data_pipeline():
    assert embedded_cpus(ClusterConfig(), train_cpus=2) >= 4
    assert embedded_cpus(ClusterConfig(data_cpus=3), train_cpus=8) >= 11
    assert embedded_cpus(ClusterConfig(num_cpus=6), train_cpus=2) == 6


@pytest.mark.integration
@pytest.mark.reliability("bad input", "more workers than the cluster can ever hold")
def test_too_many_workers_is_a_clear_error(ray_cluster):
    with pytest.raises(UserError) as err:
        check_fits(8, {"CPU": 1.0}, data_cpus=2)
    msg = str(err.value)
    assert "train.num_workers=8 needs 10 CPU" in msg and "the cluster has 4 CPU" in msg
    check_fits(2, {"CPU": 1.0}, data_cpus=2)  # the session's own sizing fits


@pytest.mark.integration
@pytest.mark.reliability("bad input", "GPUs asked of a CPU-only cluster")
def test_gpu_request_on_cpu_cluster(ray_cluster):
    with pytest.raises(UserError, match="needs 2 GPU .* the cluster has 4 CPU"):
        check_fits(2, {"CPU": 1.0, "GPU": 1.0}, data_cpus=2)


def interrupted_by_watchdog(timeout_s: float, wait) -> PlacementWatchdog:
    """Run `wait` under a watchdog of `timeout_s`; it must be interrupted within 15 s. Python's own Ctrl-C, whatever
    an earlier test's library left installed (as fit_or_explain has it)."""
    started = time.monotonic()
    with python_sigint(), PlacementWatchdog(timeout_s=timeout_s, poll_s=0.2) as dog:
        try:
            wait()
            interrupted = False
        except KeyboardInterrupt:
            interrupted = True
    assert interrupted, (dog.message, dog.error)
    assert time.monotonic() - started < 15
    return dog


@pytest.mark.integration
@pytest.mark.reliability("fault", "a placement group that can never be placed, under the watchdog")
def test_watchdog_interrupts_a_pending_placement_and_explains(ray_cluster):
    from ray.util.placement_group import placement_group, remove_placement_group

    pg = placement_group([{"CPU": 3}, {"CPU": 3}], strategy="PACK")  # 6 CPUs on a 4-CPU Ray: never placed
    try:
        dog = interrupted_by_watchdog(2, lambda: time.sleep(30))
        assert "could not be placed within cluster.placement_timeout_s=2s" in dog.message
        assert "asked for 6 CPU in 2 bundles" in dog.message
        assert "the cluster has 4 CPU" in dog.message
    finally:
        remove_placement_group(pg)


@pytest.mark.integration
@pytest.mark.reliability("fault", "a worker group that cannot be placed, asked for again and again (Ray Train's retry)")
def test_watchdog_sees_through_a_pending_group_replaced_before_the_timeout(ray_cluster):
    """Ray Train gives up on a worker group after 60 s and asks for a new one at once: no single group stays
    pending past a longer timeout, yet the run waits for ever. Groups replaced every 1 s under a 3 s timeout."""
    from ray.util.placement_group import placement_group, remove_placement_group

    groups = [placement_group([{"CPU": 6}])]  # never placed on a 4-CPU Ray

    def replace_every_second():
        for _ in range(20):
            time.sleep(1.0)
            remove_placement_group(groups[-1])
            groups.append(placement_group([{"CPU": 6}]))

    try:
        dog = interrupted_by_watchdog(3, replace_every_second)
        assert "could not be placed within cluster.placement_timeout_s=3s" in dog.message
        assert "asked for 6 CPU in 1 bundles" in dog.message
    finally:
        for pg in groups:
            remove_placement_group(pg)


@pytest.mark.integration
@pytest.mark.reliability("fault", "an elastic fit that cannot reach its minimum, inside a ray:// command's task")
def test_client_watchdog_explains_an_elastic_fit_announced_by_the_command(ray_cluster):
    """A ray:// command runs as a task off its process's main thread, where no watchdog can interrupt it; the
    client watches. An elastic fit waiting for its minimum asks for no group at all, so it announces itself under
    the job: the client's clock starts when the fit begins (preprocessing longer than the timeout is no hang)."""
    import threading

    from cluster.local import _announced_minimum, fit_or_explain

    release, returned = threading.Event(), []

    class StillWaiting:  # Ray Train's elastic fit before min workers fit: no placement group
        def fit(self):
            release.wait(60)
            return "fitted"

    def command():  # what the task does: preprocess, then fit
        time.sleep(3)
        returned.append(fit_or_explain(StillWaiting(), 2, elastic_min=(2, {"CPU": 1.5})))

    thread = threading.Thread(target=command)
    started = time.monotonic()
    thread.start()
    try:
        with python_sigint(), PlacementWatchdog(timeout_s=2, poll_s=0.2, from_job=True) as dog:
            try:
                while thread.is_alive():
                    time.sleep(0.1)
                interrupted = False
            except KeyboardInterrupt:
                interrupted = True
        took = time.monotonic() - started
    finally:
        release.set()
        thread.join(30)
    assert interrupted, (dog.message, dog.error)
    assert 5 <= took < 20, took  # 3 s before the fit began + the 2 s timeout
    assert dog.message.startswith(
        "the elastic run could not start its workers within cluster.placement_timeout_s=2s"
        ": it needs at least train.num_workers[0]=2 x 1.5 CPU, the cluster has 4 CPU"
    ), dog.message
    assert returned == ["fitted"]
    job = ray_cluster.get_runtime_context().get_job_id()
    assert _announced_minimum(job) is None  # gone with the fit: a client watching on sees no elastic fit


def test_placement_timeout_waits_longer_for_an_autoscaler(monkeypatch):
    import cluster.local as local
    from cluster.local import placement_timeout

    monkeypatch.setattr(local, "autoscaler_maximum", lambda: None)
    assert placement_timeout(ClusterConfig()) == 120
    monkeypatch.setattr(local, "autoscaler_maximum", lambda: {})  # an autoscaler of unknown reach
    assert placement_timeout(ClusterConfig()) == 900
    monkeypatch.setattr(local, "autoscaler_maximum", lambda: {"CPU": 64.0, "GPU": 8.0})
    assert placement_timeout(ClusterConfig()) == 900
    assert placement_timeout(ClusterConfig(placement_timeout_s=30)) == 30


def pending_run(tmp_path, artifacts, held_cpus: float, prepared: str | None = None, **train) -> tuple[int, float]:
    """The real command on the session's 4-CPU Ray while another job holds `held_cpus` of them; on `prepared` data
    (no pipeline to starve first) when given."""
    from conftest import write_config
    from ray.util.placement_group import placement_group, remove_placement_group

    from zeray.cli import main

    data = {"prepared": prepared} if prepared else {"train": artifacts["data"], "format": "messages", "max_length": 96}
    config = write_config(
        tmp_path / "pending.yaml",
        name="pending",
        storage=str(tmp_path / "runs"),
        data=data,
        model={"name_or_path": artifacts["model"]},
        train={"num_workers": 2, "max_steps": 4, "micro_batch_size": 8, "zero_stage": 0, **train},
        cluster={"placement_timeout_s": 5, "data_cpus": 1},
    )
    other = placement_group([{"CPU": held_cpus}])
    assert other.wait(30)
    started = time.monotonic()
    try:
        code = main(["train", config])
    finally:
        remove_pending_groups()
        remove_placement_group(other)
    return code, time.monotonic() - started


def remove_pending_groups() -> None:
    """The stopped run's worker group, still pending, removed before the test's held CPUs come free: else it takes
    them into the next test (its controller acts on the stop only when its wait for the group ends, Ray Train's
    60 s; a command's own process would take its controller with it)."""
    import ray
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    job = ray.get_runtime_context().get_job_id()
    for pg_id, info in ray.util.placement_group_table().items():
        if info["state"] == "PENDING" and pg_id.endswith(job):
            remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(pg_id))))


def own_output(err: str) -> str:
    """The command's own stderr, without what Ray's loggers write to the stderr of an earlier test's capsys, now
    closed: Python reports each such write as a "--- Logging error ---" block. (Lines of the session Ray's other
    processes, such as an earlier test's aborted Train controller reporting its timeout, go to ray-system.log: see
    conftest.)"""
    return re.sub(r"--- Logging error ---.*?\nArguments:[^\n]*\n", "", err, flags=re.S)


# first of the pending runs: a stopped in-process run's controller lingers (see remove_pending_groups), and this
# run's message counts on finding only the CPUs the test holds taken
@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.reliability("fault", "preprocessing starved of CPUs by another job")
def test_data_pipeline_starved_of_cpus_exits_2_with_the_explanation(ray_cluster, artifacts, tmp_path, capsys):
    capsys.readouterr()
    code, took = pending_run(tmp_path, artifacts, held_cpus=3)  # 1 CPU left: its tokenizer actor or its reads
    err = capsys.readouterr().err
    assert code == 2 and took < 120, (code, took, err)
    assert (
        "data: preprocessing could not go on for 5s (cluster.placement_timeout_s): it needs 1 CPU to read and "
        "1 for its tokenizer actors (data.tokenizer_actors), and the cluster has 4 CPU in total"
    ) in err, err
    assert "Traceback" not in own_output(err), err[-3000:]


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.reliability("fault", "`zeray train` whose workers cannot be placed (another job holds the CPUs)")
def test_train_whose_workers_cannot_be_placed_exits_2_with_the_explanation(
    ray_cluster, artifacts, prepared_data, tmp_path, capsys
):
    handler = signal.getsignal(signal.SIGINT)
    capsys.readouterr()
    # 2 x 1.5 CPU + 1 for Ray Data fit the cluster on paper; with 2 CPUs held, the data is read and the workers'
    # 3 CPUs never come free
    code, took = pending_run(tmp_path, artifacts, held_cpus=2, prepared=prepared_data, cpus_per_worker=1.5)
    err = capsys.readouterr().err
    assert code == 2 and took < 120, (code, took, err)
    assert "could not be placed within cluster.placement_timeout_s=5s: asked for 3 CPU in 2 bundles" in err, err
    assert "the cluster has 4 CPU" in err and "2 CPU free" in err, err
    assert "Traceback" not in own_output(err), err[-3000:]
    assert signal.getsignal(signal.SIGINT) is handler  # Ctrl-C means what it meant before the run (Ray Train
    # leaves its own handler behind)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.reliability("fault", "an elastic `zeray train` whose minimum of workers cannot be placed")
def test_an_elastic_run_that_cannot_reach_its_minimum_exits_2_with_the_explanation(
    ray_cluster, artifacts, prepared_data, tmp_path, capsys
):
    capsys.readouterr()
    code, took = pending_run(
        tmp_path, artifacts, held_cpus=2, prepared=prepared_data, num_workers=[2, 3], cpus_per_worker=1.5
    )
    err = capsys.readouterr().err
    assert code == 2 and took < 120, (code, took, err)
    # the minimum named, whether Ray Train's elastic policy asked for a group that stays pending (it sizes it by
    # what the nodes hold: 2 workers here) or for none
    assert re.search(
        r"error: the elastic run could not start its workers within cluster.placement_timeout_s=5s: it needs at "
        r"least train.num_workers\[0\]=2 x 1.5 CPU( \(asked for 3 CPU in 2 bundles\))?, the cluster has 4 CPU"
        r".* in total and 2 CPU free",
        err,
    ), err
    assert "Traceback" not in own_output(err), err[-3000:]
