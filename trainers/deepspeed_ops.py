"""Build DeepSpeed's C++ ops that zeray's runs load, ahead of time (`./run.sh` setup calls this).

DeepSpeed compiles them on first use and caches them under ~/.cache/torch_extensions (TORCH_EXTENSIONS_DIR): on
2 cores about a minute each, paid inside the first run (its workers wait on one another's build lock), or inside
the test that happens to come first.
"""

import time

# what a run loads: the shared-memory collectives on CPU (every run), CPU Adam (train.offload: cpu)
OPS = ("ShareMemCommBuilder", "CPUAdamBuilder")


def build_ops() -> list[str]:
    from deepspeed.accelerator import get_accelerator

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
