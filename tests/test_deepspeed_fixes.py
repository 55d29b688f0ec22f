"""trainers/deepspeed_fixes.py: an fp32 ZeRO-3 run keeps one fp32 copy of its partition, and trains exactly as
with DeepSpeed's second copy; its engine starts without loading torch's inductor for DeepSpeed's Muon kernels,
which compile at their first call instead."""

import json
import os
import subprocess
import sys

import torch

from tests.conftest import REPO, free_port

# one process, one rank: ZeRO-3 at fp32 with zeray's DeepSpeed config, three AdamW steps with clipping
STEPS = r"""
import json, os, sys
import torch, deepspeed
from transformers import AutoModelForCausalLM
from trainers.config import TrainConfig
from trainers.deepspeed_config import deepspeed_config
from trainers.deepspeed_fixes import defer_muon_compile, share_fp32_master_partitions
from trainers.deepspeed_ops import use_own_op_builds

use_own_op_builds()  # as zeray's training loop does
model_dir, fixed, out = sys.argv[1], sys.argv[2] == "fixed", sys.argv[3]
if fixed:
    share_fp32_master_partitions()
    share_fp32_master_partitions()  # a second call changes nothing
    defer_muon_compile()
    defer_muon_compile()
torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
config = deepspeed_config(TrainConfig(zero_stage=3, micro_batch_size=2, grad_clip=0.5, lr=1e-2), 1, "fp32",
                          model.config.hidden_size)
engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=config)
optimizer = engine.optimizer
shared = [master.untyped_storage().data_ptr() == own.untyped_storage().data_ptr()
          for master, own in zip(optimizer.fp32_partitioned_groups_flat, optimizer.fp16_partitioned_groups_flat)]
ids = torch.randint(0, model.config.vocab_size, (3, 2, 32), generator=torch.Generator().manual_seed(1))
losses = []
for batch in ids:
    loss = engine(input_ids=batch, labels=batch, use_cache=False).loss
    engine.backward(loss)
    engine.step()
    losses.append(loss.item())
torch.save([p.ds_tensor.detach().clone() for p in engine.module.parameters()], out)
inductor = "torch._inductor.compile_fx" in sys.modules  # what torch.compile loads as it decorates a kernel
# a Muon kernel, called: compiled once, at its first call (torch.compile recorded, as a pass-through)
from deepspeed.runtime.zero.muon import original_muon
compiled = []
torch.compile = lambda kernel: compiled.append(kernel.__name__) or kernel
grad = torch.randn(16, 8, generator=torch.Generator().manual_seed(2))
first = original_muon.zeropower_via_newtonschulz5(grad, 5)
again = original_muon.zeropower_via_newtonschulz5(grad, 5)
eager = original_muon.zeropower_via_newtonschulz5.__wrapped__(grad, 5) if fixed else first
print(json.dumps({"shared": shared, "losses": losses, "inductor": inductor, "compiled": compiled,
                  "muon": [torch.equal(first, eager), torch.equal(again, eager)]}))
"""


def _train(model: str, fixed: bool, out: str) -> dict:
    env = dict(
        os.environ,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
        PYTHONPATH=REPO,
    )
    done = subprocess.run(
        [sys.executable, "-c", STEPS, model, "fixed" if fixed else "as-is", out],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_zero3_fp32_steps_its_parameter_partition_in_place_with_the_same_result(artifacts, tmp_path):
    as_is = _train(artifacts["model"], False, str(tmp_path / "as-is.pt"))
    fixed = _train(artifacts["model"], True, str(tmp_path / "fixed.pt"))
    # DeepSpeed as installed copies every partition; fixed, the master partition is the parameters' own
    assert as_is["shared"] and not any(as_is["shared"])
    assert fixed["shared"] and all(fixed["shared"])
    # the same training, bit for bit
    assert fixed["losses"] == as_is["losses"] and fixed["losses"][2] < fixed["losses"][0]
    before, after = torch.load(tmp_path / "as-is.pt"), torch.load(tmp_path / "fixed.pt")
    assert len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(before, after))
    # DeepSpeed as installed loads inductor while it starts its engine; fixed, Muon's kernels wait for a first call
    assert as_is["inductor"] and as_is["compiled"] == []
    assert not fixed["inductor"] and fixed["compiled"] == ["zeropower_via_newtonschulz5"]
    assert fixed["muon"] == [True, True]  # (the kernel's own result, first call and second)
