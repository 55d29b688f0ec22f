"""Two corrections to the installed DeepSpeed (0.19), checked by tests/test_deepspeed_fixes.py: a bug that costs
memory, and an import that costs every worker about half a CPU-second as it starts.

ZeRO-3 means to use a parameter partition that is already fp32, on the optimizer's device, as the optimizer's fp32
master partition instead of copying it (`_create_fp32_partitions`: "we don't need another copy of the weights").
Its test compares the partition's `torch.device` with the accelerator's device name, a string, which torch never
finds equal: an fp32 ZeRO-3 run keeps two fp32 copies of its partition, 10 bytes per parameter and worker at 2
workers instead of 8. Comparing with the device the string names gives what DeepSpeed intends; the optimizer then
steps the partition the model gathers from, which holds the same numbers the copy-back held before.
"""

import functools
import sys

import torch


def share_fp32_master_partitions() -> None:
    """Let ZeRO-3's test for an fp32 partition on its own device see it (idempotent; once per worker process)."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Stage3

    create = Stage3._create_fp32_partitions
    if getattr(create, "zeray_fixed", False):
        return

    @functools.wraps(create)
    def create_with_a_device(self):
        named = self.device
        if isinstance(named, str):
            self.device = torch.device(named)
        try:
            create(self)
        finally:
            self.device = named

    create_with_a_device.zeray_fixed = True
    Stage3._create_fp32_partitions = create_with_a_device


def defer_muon_compile() -> None:
    """Every ZeRO stage imports DeepSpeed's Muon optimizer to ask `isinstance(optimizer, MuonWithAuxAdam)`, and
    Muon's kernels are decorated with torch.compile as they are imported: that loads torch's inductor, about half
    a CPU-second in every worker of every run and restart (docs/benchmarks.md), for an optimizer zeray never
    builds (its own is AdamW). Imported here with each kernel compiled at its first call instead, the import costs
    nothing, and Muon would run as compiled as before (idempotent; once per worker process, before
    deepspeed.initialize)."""
    if "deepspeed.runtime.zero.muon.original_muon" in sys.modules:
        return
    from deepspeed.runtime import compiler

    at_import = compiler.compile

    def at_first_call():
        def decorate(kernel):
            compiled = None

            @functools.wraps(kernel)
            def call(*args, **kwargs):
                nonlocal compiled
                if compiled is None:
                    compiled = torch.compile(kernel)
                return compiled(*args, **kwargs)

            return call

        return decorate

    compiler.compile = at_first_call
    try:
        import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: F401  (imports original_muon's kernels)
    finally:
        compiler.compile = at_import
