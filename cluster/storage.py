"""Where a run's files live, and whether this cluster can use that place (checked before any worker starts).

`storage` is a local path or a URI (s3://, gs://, abfs://, hdfs://). Ray Train writes checkpoints straight into
it through pyarrow's filesystem, Ray Data writes the prepared Parquet there, and zeray's own outputs (config.json,
metrics.jsonl, summary.json, report.png, model/, tensorboard/) are written to a local folder on the driver's node
and copied up as they change (`RunStore`). An object store is shared by every node by nature.

On one node every local path is shared. With several nodes (or an autoscaler that can add them) each node writes its
checkpoint shards, Ray Data's Parquet and the metrics into `storage` and reads the data and the model from their
paths: a node-local path would scatter the run over disks no other node sees, and the export at the end would
find a fraction of the shards. Local paths are then allowed only when the config declares that every node mounts
them at the same place (`cluster.shared_storage: true`: NFS, a ReadWriteMany volume, the same machine).
"""

import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass

import pyarrow.fs as pafs
import ray

from cluster.local import autoscaler_maximum
from core.errors import UserError
from core.fs import display, download, exists, is_local, is_uri, reach, resolve, upload
from core.process import alive

# what a re-run of an object-store run continues
PULLED = ("config.json", "metrics.jsonl", "mlflow_run.json", "wandb_run.json")
STAGING_PREFIX = "zeray-run-"  # + the pid of the process staging there


@dataclass
class RunStore:
    """A run folder `<storage>/<name>` in its filesystem (`fs`, `path`), and `local`: the folder on this node
    where zeray writes the run's own files — the run folder itself on a local disk, a staging folder mirrored to
    the object store otherwise (`push`)."""

    fs: pafs.FileSystem
    path: str
    local: str

    @property
    def mirrored(self) -> bool:
        return not is_local(self.fs)

    def exists(self, name: str) -> bool:
        return exists(self.fs, f"{self.path}/{name}")

    def location(self, path: str) -> str:
        """A path in this store as the user names it (the URI on an object store)."""
        return display(self.fs, path)

    def push(self, name: str) -> None:
        """Copy `local/name` (a file or a folder) up to the store; nothing to do on a local disk."""
        if self.mirrored and os.path.exists(os.path.join(self.local, name)):
            upload(os.path.join(self.local, name), self.fs, f"{self.path}/{name}")


@contextmanager
def run_store(run_dir: str):
    """The `RunStore` of a run folder. For an object store: a staging folder holding what a re-run continues
    (PULLED), every file of it copied up when the block ends, however it ends, and then removed."""
    fs, path = resolve(run_dir, "storage")
    if is_local(fs):
        os.makedirs(path, exist_ok=True)
        yield RunStore(fs, path, path)
        return
    remove_orphaned_staging()
    staging = tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-")
    store = RunStore(fs, path, staging)
    try:
        for name in PULLED:
            if store.exists(name):
                download(fs, f"{path}/{name}", os.path.join(staging, name))
        yield store
    finally:
        try:
            for name in sorted(os.listdir(staging)):
                store.push(name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def check_storage(cfg) -> None:
    """A UserError naming the path and the fix when a multi-node cluster would write to or read from node-local
    paths (an object-store URI is fine everywhere; one pyarrow cannot open fails here)."""
    if is_uri(cfg.storage) and not is_local(reach(cfg.storage, "storage")[0]):
        return
    if cfg.cluster.shared_storage:
        return
    nodes = sum(1 for node in ray.nodes() if node["Alive"])
    grows = autoscaler_maximum() is not None
    if nodes <= 1 and not grows:
        return
    where = f"{nodes} nodes" + (" and an autoscaler that can add more" if grows else "")
    raise UserError(
        f"storage: {cfg.storage} is a path on this node, but the cluster has {where}: checkpoints, data and "
        "metrics written on the other nodes would land on their own disks. Point storage at an object store "
        "(s3://, gs://, abfs://) or at a directory every node mounts (and data.train, model.name_or_path there "
        "too) and set cluster.shared_storage: true"
    )


def remove_orphaned_staging() -> None:
    """Remove the staging folders (in this node's temp dir) of processes that died without removing theirs: a
    killed driver, a Tune trial its scheduler stopped. What they had copied up is in the store; the rest of a run
    that never ended (summary, model) was never written."""
    root = tempfile.gettempdir()
    for name in os.listdir(root):
        found = re.fullmatch(rf"{STAGING_PREFIX}(\d+)-\w+", name)
        if found and not alive(int(found.group(1))):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
