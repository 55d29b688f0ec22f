"""Ray workers' output on a zeray command's console: the lines zeray's workers mark as their own (`worker_line`)
reach the console without Ray's `(pid=...)` prefix; everything else the workers print goes to the command's log file
(see core.console.quiet_console), or, verbose, to the console as Ray prints it.

Ray relays worker output to the driver through one dispatcher; `relayed_workers` swaps Ray's handler for zeray's
once the command's Ray is up (`relay_worker_output`, called by cluster.local.ray_session).
"""

import re
import sys
from contextlib import contextmanager

from core.console import console

MARK = "[zeray] "  # what a worker's line for the console starts with (stripped by the relay)
RELAY = "zeray_print_logs"
_relay_to: dict = {}  # while a command's block holds: {"log": its log file, or None to print everything}


def worker_line(message: str) -> None:
    """A progress line from a Ray worker to the driver's console. Straight to the process's stdout: Ray Train's
    patched print() would echo it twice (its logger plus Ray's stdout forwarding)."""
    print(f"{MARK}{message}", file=sys.__stdout__, flush=True)


@contextmanager
def relayed_workers(log):
    """Within the block, a Ray the command starts relays its workers' output through zeray (`log`: the open log
    file for what is not zeray's, or None for the console)."""
    _relay_to["log"] = log
    try:
        yield
    finally:
        _relay_to.clear()
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

        dispatcher.remove_handler(RELAY)


def relay_worker_output() -> None:
    """Once the command's Ray is up: Ray's relay of worker output replaced by zeray's (outside `relayed_workers`,
    say a test's own Ray, Ray's stays)."""
    if not _relay_to:
        return
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler(RELAY, Relay(_relay_to["log"], console()).handle)


class Relay:
    """Handles Ray's batches of worker output lines: zeray's to `out` (on a terminal the step lines drive a tqdm
    progress bar, the other lines print above it), the rest to `log`, or with no log to the console as Ray prints
    them."""

    STEP = re.compile(r"^step (\d+)/(\d+) (.*)$")

    def __init__(self, log, out):
        self.log, self.out = log, out
        self.bar = None

    def handle(self, batch: dict) -> None:
        lines = batch.get("lines", [])
        for line in lines:
            if line.startswith(MARK):
                self.show(line[len(MARK) :])
        rest = [line for line in lines if not line.startswith(MARK)]
        if not rest:
            return
        if self.log is None:
            import ray._private.worker as ray_worker

            ray_worker.print_to_stdstream({**batch, "lines": rest}, ignore_prefix=False)
            return
        who = batch.get("actor_name") or batch.get("task_name") or ""
        where = f", ip={batch['ip']}" if batch.get("ip") else ""
        self.log.write("".join(f"({who} pid={batch.get('pid')}{where}) {line}\n" for line in rest))

    def show(self, line: str) -> None:
        step = self.STEP.match(line)
        if not self.out.isatty():
            print(line, file=self.out, flush=True)
        elif step:
            from tqdm import tqdm

            done, total = int(step.group(1)), int(step.group(2))
            if self.bar is None or self.bar.total != total or done < self.bar.n:  # (a restarted run starts anew)
                self.close()
                # (position 0: the console's one bar, below the lines, whatever other bars this process made)
                self.bar = tqdm(total=total, initial=done, file=self.out, unit="step", dynamic_ncols=True, position=0)
            self.bar.update(done - self.bar.n)
            self.bar.set_postfix_str(step.group(3).split(" eta ")[0])  # (tqdm shows its own rate and ETA)
            if done == total:
                self.close()
        elif self.bar is not None:
            self.bar.write(line, file=self.out)
        else:
            print(line, file=self.out, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
