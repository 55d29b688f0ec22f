"""Security defaults that must not drift: remote code off, the embedded dashboard on loopback, Ray's token
authentication left as Ray sets it."""

import os

import pytest

from cluster.config import ClusterConfig
from cluster.local import ray_session
from zeray.config import load_config


@pytest.mark.reliability("bad input", "a model that needs remote code, without `trust_remote_code`")
def test_remote_code_is_off_unless_the_config_says_so(artifacts, tmp_path):
    from conftest import write_config

    config = write_config(tmp_path / "c.yaml", data={"train": artifacts["data"]},
                          model={"name_or_path": artifacts["model"]})
    assert load_config(config, []).model.trust_remote_code is False
    assert load_config(config, ["model.trust_remote_code=true"]).model.trust_remote_code is True


@pytest.mark.parametrize("address", [None, "ray://head:10001"])
def test_embedded_ray_binds_the_dashboard_to_loopback_and_keeps_auth(monkeypatch, address):
    import ray

    calls = []
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    with ray_session(ClusterConfig(address=address), train_cpus=2):
        pass
    (kwargs,) = calls
    if address:
        assert kwargs["address"] == address and "dashboard_host" not in kwargs
    else:
        assert kwargs["dashboard_host"] == "127.0.0.1"
    # nothing zeray passes or sets turns Ray's token authentication off
    assert not any("auth" in key.lower() for key in kwargs)
    assert "RAY_AUTH_MODE" not in os.environ
