"""Processes on this machine."""

import os


def alive(pid: int) -> bool:
    """Whether process `pid` exists (a lock or staging folder named after it is still in use)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True
