"""The console is for people: zeray's own lines go there (`say`), everything the libraries print goes to a log file
while `quiet_console` holds.

`quiet_console(path)` points the process's stdout and stderr (its file descriptors and Python's streams) at the log
file: Python loggers, tqdm bars, C++ logs and anything else written to them land there. `say` and `warn` write to the
real console, which the block keeps open on descriptors of its own.
"""

import io
import os
import sys
from contextlib import contextmanager

_console: dict = {}  # while quiet_console holds: "out" and "err", the real console's streams


def console():
    """The stream zeray's own lines go to: the real console while quiet_console holds, else stdout."""
    return _console.get("out") or sys.stdout


def say(*values, sep: str = " ", end: str = "\n") -> None:
    """A line for the person at the console (print's signature, always flushed)."""
    print(*values, sep=sep, end=end, file=console(), flush=True)


def warn(message: str) -> None:
    """A warning the user must see, on the console's stderr."""
    print(f"warning: {message}", file=_console.get("err") or sys.stderr, flush=True)


@contextmanager
def quiet_console(log_path: str, verbose: bool = False):
    """Everything written to stdout/stderr inside the block goes to `log_path` (appended), except `say`/`warn`;
    yields the open log file. `verbose`: nothing is redirected (yields None)."""
    if verbose:
        yield None
        return
    os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    log = open(log_path, "a", encoding="utf-8", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    _console["out"], _console["err"] = (
        io.TextIOWrapper(os.fdopen(os.dup(fd), "wb", buffering=0), write_through=True) for fd in saved
    )
    # Python's own writes too where sys.stdout is not descriptor 1 (pytest's capture, a notebook)
    streams, sys.stdout, sys.stderr = (sys.stdout, sys.stderr), log, log
    try:
        yield log
    finally:
        sys.stdout, sys.stderr = streams
        for stream in (sys.stdout, sys.stderr, *_console.values()):
            stream.flush()
        for stream in _console.values():
            stream.close()
        _console.clear()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        log.close()
