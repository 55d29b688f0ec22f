"""The `cluster:` section of a run config."""

from pydantic import Field

from zeray.section import Section


class ClusterConfig(Section):
    address: str | None = None
    """Existing Ray cluster (`ray://host:10001`, `auto`); unset with no RAY_ADDRESS starts an embedded local Ray."""
    num_cpus: int | None = Field(None, ge=1)
    """Logical CPUs of the embedded Ray; default: training workers' CPUs + `data_cpus`, at least the machine's cores."""
    data_cpus: float = Field(2.0, ge=1.0)
    """Logical CPUs kept for Ray Data beside the training workers, so the pipeline can never be starved."""
    dashboard_host: str = "127.0.0.1"
    """Interface the embedded Ray dashboard binds to; localhost unless you mean to expose it."""
    placement_timeout_s: float = Field(120.0, gt=0)
    """Give up, naming what was asked and what the cluster has, if the workers cannot be placed in this time."""
