"""Build DeepSpeed's C++ ops that zeray's runs load, ahead of time (`./run.sh` setup calls this).

DeepSpeed compiles them on first use and caches them (see use_own_op_builds): on 2 cores about a minute each, paid
inside the first run (its workers wait on one another's build lock), or inside the test that happens to come first.
"""

import os
import sys
import time

# what a run loads: the shared-memory collectives on CPU (every run), CPU Adam (train.offload: cpu)
OPS = ("ShareMemCommBuilder", "CPUAdamBuilder")


def use_own_op_builds() -> None:
    """Build and re-check the ops with this Python's own tools, into this Python's own cache; each run's workers
    and the setup build call this before DeepSpeed loads an op.

    - ninja: the one DeepSpeed installed (the `ninja` package), first on PATH. torch uses whichever ninja PATH
      finds, and ninja versions hash their build logs differently (1.11 on the system, 1.13 from pip): each
      rebuilds what the other built, a minute on 2 cores inside a run.
    - the cache: <this environment>/torch_extensions unless TORCH_EXTENSIONS_DIR says otherwise. The default
      ~/.cache/torch_extensions is shared by every environment of the user, and the ops' build files name their
      environment's paths: two checkouts (or CI's fresh clone beside a working one) rebuilt each other's ops."""
    import ninja

    path = os.environ.get("PATH", "")
    if path.split(os.pathsep)[0] != ninja.BIN_DIR:
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + path
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))


def import_deepspeed():
    """`import deepspeed`, without the MLflow import it makes on the way: its autotuner (which zeray does not run)
    imports MLflow when it is installed, as zeray's tracking extra installs it. That is 0.8 s of CPU in every
    worker of every run (each a fresh process), for a module the workers never use; the driver imports MLflow
    itself when train.mlflow_uri asks for it."""
    if "deepspeed" in sys.modules or "mlflow" in sys.modules:
        import deepspeed

        return deepspeed
    sys.modules["mlflow"] = None  # `import mlflow` raises ImportError: the autotuner takes MLflow as absent
    try:
        import deepspeed
    finally:
        del sys.modules["mlflow"]  # a later `import mlflow` in this process imports it as usual
    return deepspeed


def build_ops() -> list[str]:
    from deepspeed.accelerator import get_accelerator

    use_own_op_builds()
    built = []
    for name in OPS:
        builder = get_accelerator().create_op_builder(name)
        if builder is None or not builder.is_compatible(verbose=False):  # not an op of this accelerator
            continue
        started = time.monotonic()
        builder.load(verbose=False)
        built.append(f"{builder.NAME} ({time.monotonic() - started:.0f}s)")
    return built


if __name__ == "__main__":
    print("setup: DeepSpeed ops ready: " + (", ".join(build_ops()) or "none needed"), flush=True)
