"""The console is for people: library output to the log file, zeray's lines to the console (and, on a terminal, the
workers' step lines as a progress bar)."""

import io
import logging
import os

from cluster.console import MARK, Relay
from core.console import quiet_console, say, warn


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def batch(*lines: str, pid: int = 7) -> dict:
    return {"lines": list(lines), "pid": pid, "actor_name": "RayTrainWorker", "ip": "10.0.0.2"}


def test_library_output_goes_to_the_log_and_zeray_s_lines_to_the_console(tmp_path, capfd):
    log = tmp_path / "logs" / "train.log"
    # a library's logger, set up before the command on the process's stderr (what sys.stderr is outside pytest)
    handler = logging.StreamHandler(open(2, "w", buffering=1, closefd=False))
    library = logging.getLogger("some.library")
    library.addHandler(handler)
    try:
        with quiet_console(str(log)):
            os.write(1, b"native stdout\n")  # a C++ log line, say
            os.write(2, b"native stderr\n")
            library.warning("a library warning")
            say("data: 10 records")
            warn("disk nearly full")
    finally:
        library.removeHandler(handler)
    out, err = capfd.readouterr()
    assert out == "data: 10 records\n" and err == "warning: disk nearly full\n"
    assert log.read_text() == "native stdout\nnative stderr\na library warning\n"
    say("after")  # the console is itself again
    assert capfd.readouterr().out == "after\n"


def test_relay_sends_zeray_s_lines_to_the_console_and_the_rest_to_the_log():
    log, out = io.StringIO(), io.StringIO()
    relay = Relay(log, out)
    relay.handle(batch(f"{MARK}step 2/4 epoch 1 loss 3.0000 lr 1.00e-03 tokens/s 100 eta 0m10s", "INFO noise"))
    relay.handle(batch("[A\\x1b progress", pid=9))
    assert out.getvalue() == "step 2/4 epoch 1 loss 3.0000 lr 1.00e-03 tokens/s 100 eta 0m10s\n"  # a pipe: lines
    assert log.getvalue() == (
        "(RayTrainWorker pid=7, ip=10.0.0.2) INFO noise\n(RayTrainWorker pid=9, ip=10.0.0.2) [A\\x1b progress\n"
    )


def test_on_a_terminal_the_step_lines_drive_a_progress_bar():
    out = Terminal()
    relay = Relay(io.StringIO(), out)
    relay.handle(batch(f"{MARK}eval of the base model: loss 3.2283"))
    relay.handle(batch(f"{MARK}step 2/4 epoch 1 loss 3.5477 lr 2.00e-03 tokens/s 84 eta 0m46s"))
    assert relay.bar is not None and relay.bar.n == 2 and relay.bar.total == 4
    relay.handle(batch(f"{MARK}eval step 2: loss 2.9000"))
    relay.handle(batch(f"{MARK}step 4/4 epoch 1 loss 2.3776 lr 1.77e-03 tokens/s 137 eta 0m00s"))
    assert relay.bar is None  # closed at the last step
    shown = out.getvalue()
    assert shown.startswith("eval of the base model: loss 3.2283\n")
    assert " 2/4 " in shown and " 4/4 " in shown and "100%" in shown
    assert "loss 3.5477 lr 2.00e-03 tokens/s 84" in shown and "eta 0m46s" not in shown  # tqdm shows its own ETA
    assert "\reval step 2: loss 2.9000\n\r 50%|" in shown  # the bar cleared, the line, the bar again below it


def test_a_command_refused_after_its_log_opened_leaves_no_run_folder(tmp_path, artifacts, capsys, monkeypatch):
    from conftest import write_config

    from zeray.cli import main

    monkeypatch.setattr("zeray.cli._ray_running", lambda: False)  # as from a shell, whatever Ray this session has

    config = write_config(
        tmp_path / "c.yaml",
        name="refused",
        storage=str(tmp_path / "runs"),
        data={"train": artifacts["data"], "format": "messages"},
        model={"name_or_path": artifacts["model"]},
    )
    assert main(["eval", config, "--model", "s3://bucket/model"]) == 2
    out, err = capsys.readouterr()
    assert out == (
        f"logs: {tmp_path / 'runs' / 'refused' / 'logs' / 'eval.log'} (Ray's, DeepSpeed's and transformers' output; "
        "--verbose shows it here)\n"
    )
    assert err.startswith("error: --model s3://bucket/model: give a local model directory") and err.count("\n") == 1
    assert not (tmp_path / "runs").exists() or not os.listdir(tmp_path / "runs")
