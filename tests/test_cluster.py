"""Never hang on resources: impossible requests fail at once, unplaceable ones after the timeout, both explained."""

import time

import pytest

from cluster.config import ClusterConfig
from cluster.local import PlacementWatchdog, check_fits, embedded_cpus
from zeray.errors import UserError

pytestmark = pytest.mark.integration


def test_embedded_ray_leaves_room_for_the_data_pipeline():
    assert embedded_cpus(ClusterConfig(), train_cpus=2) >= 4
    assert embedded_cpus(ClusterConfig(data_cpus=3), train_cpus=8) >= 11
    assert embedded_cpus(ClusterConfig(num_cpus=6), train_cpus=2) == 6


def test_too_many_workers_is_a_clear_error(ray_cluster):
    with pytest.raises(UserError) as err:
        check_fits(8, {"CPU": 1.0}, data_cpus=2)
    msg = str(err.value)
    assert "train.num_workers=8 needs 10 CPU" in msg and "the cluster has 4 CPU" in msg
    check_fits(2, {"CPU": 1.0}, data_cpus=2)  # the session's own sizing fits


def test_gpu_request_on_cpu_cluster(ray_cluster):
    with pytest.raises(UserError, match="needs 2 GPU .* the cluster has 4 CPU"):
        check_fits(2, {"CPU": 1.0, "GPU": 1.0}, data_cpus=2)


def test_watchdog_interrupts_a_pending_placement_and_explains(ray_cluster):
    from ray.util.placement_group import placement_group, remove_placement_group

    pg = placement_group([{"CPU": 3}, {"CPU": 3}], strategy="PACK")  # 6 CPUs on a 4-CPU Ray: never placed
    started = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            with PlacementWatchdog(timeout_s=2, poll_s=0.2) as dog:
                time.sleep(30)
        assert time.monotonic() - started < 15
        assert "could not be placed within cluster.placement_timeout_s=2s" in dog.message
        assert "asked for 6 CPU in 2 bundles" in dog.message
        assert "the cluster has 4 CPU" in dog.message
    finally:
        remove_placement_group(pg)


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
