"""The `cluster:` section of a run config."""

from pydantic import Field

from core.section import Section


class ClusterConfig(Section):
    address: str | None = None
    """Existing Ray cluster: `ray://head:10001` or `auto` to drive it from here, `http://head:8265` for
    `zeray submit`; unset with no RAY_ADDRESS starts an embedded local Ray. Inside a Ray Job, the job's cluster."""
    num_cpus: int | None = Field(None, ge=1)
    """Logical CPUs of the embedded Ray; default: training workers' CPUs + `data_cpus`, at least the machine's cores."""
    data_cpus: float = Field(2.0, ge=1.0)
    """Logical CPUs kept for Ray Data beside the training workers, so the pipeline can never be starved."""
    shared_storage: bool = False
    """Every node mounts the config's local paths (storage, data, model) at the same place: NFS, a ReadWriteMany
    volume, one machine. Required for local paths on a multi-node or autoscaling cluster."""
    dashboard_host: str = "127.0.0.1"
    """Interface the embedded Ray dashboard binds to; localhost unless you mean to expose it."""
    placement_timeout_s: float | None = Field(None, gt=0)
    """Give up, naming what was asked and what the cluster has, if the workers cannot be placed in this time.
    Default: 120 s on a cluster of fixed size, 900 s when an autoscaler can add nodes (GPU nodes take minutes)."""
