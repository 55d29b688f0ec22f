"""Storage a run can use on this cluster, checked before any worker starts.

On one node every path is shared. With several nodes (or an autoscaler that can add them) each node writes its
checkpoint shards, Ray Data's Parquet and the metrics into `storage` and reads the data and the model from their
paths: a node-local path would scatter the run over disks no other node sees, and the export at the end would
find a fraction of the shards. Local paths are then allowed only when the config declares that every node mounts
them at the same place (`cluster.shared_storage: true`: NFS, a ReadWriteMany volume, the same machine).
"""

import ray

from cluster.local import autoscaler_maximum
from zeray.errors import UserError


def is_uri(path: str) -> bool:
    return "://" in path


def check_storage(cfg) -> None:
    """A UserError naming the path and the fix when a multi-node cluster would write to or read from node-local
    paths."""
    if is_uri(cfg.storage):
        raise UserError(f"storage: {cfg.storage}: zeray writes runs to a filesystem path; on a multi-node cluster "
                        "use a directory every node mounts (NFS, a ReadWriteMany volume) with "
                        "cluster.shared_storage: true")
    if cfg.cluster.shared_storage:
        return
    nodes = sum(1 for node in ray.nodes() if node["Alive"])
    grows = autoscaler_maximum() is not None
    if nodes <= 1 and not grows:
        return
    where = f"{nodes} nodes" + (" and an autoscaler that can add more" if grows else "")
    raise UserError(
        f"storage: {cfg.storage} is a path on this node, but the cluster has {where}: checkpoints, data and "
        "metrics written on the other nodes would land on their own disks. Point storage (and data.train, "
        "model.name_or_path) at a directory every node mounts and set cluster.shared_storage: true")
