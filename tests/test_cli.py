"""The CLI turns user errors raised deep inside Ray (tasks, Train workers) into the one-line exit-2 form."""

import pytest
from ray.train import WorkerGroupError
from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

from zeray.cli import _unwrap_user_errors
from zeray.errors import UserError


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
