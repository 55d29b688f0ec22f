"""The CLI turns user errors raised deep inside Ray (tasks, Train workers) into the one-line exit-2 form."""

import os
import subprocess
import sys

import pytest
from conftest import REPO
from ray.train import WorkerGroupError
from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

from core.errors import UserError
from zeray.cli import _unwrap_user_errors


def test_user_error_from_a_train_worker_is_unwrapped():
    inner = UserError("checkpoint file x.pt failed the weights-only safety check")

    def fails():
        raise WorkerGroupError("rank 1 failed", {1: UserExceptionWithTraceback(inner, "Traceback ...")})

    with pytest.raises(UserError, match="weights-only safety check"):
        _unwrap_user_errors(fails)


def test_other_errors_pass_through():
    def fails():
        raise WorkerGroupError("boom", {0: RuntimeError("gloo connection reset")})

    with pytest.raises(WorkerGroupError):
        _unwrap_user_errors(fails)


def test_the_gpu_benchmark_says_in_one_line_that_it_needs_a_gpu():
    done = subprocess.run(
        [sys.executable, os.path.join(REPO, "bench", "gpu.py")], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        "error: bench/gpu.py needs NVIDIA GPUs with CUDA (torch.cuda.is_available() is False here)"
    ]
