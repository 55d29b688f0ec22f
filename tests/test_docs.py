"""Every `zeray ...` command the README and docs/ show in a code block, and every example `zeray COMMAND --help`
shows, parses with the real CLI parser, and where it names one of the project's configs, the config loads with its
overrides (an error example must fail with the error line the page shows). A renamed flag, key or command breaks a
page here first."""

import glob
import os
import re
import shlex

import pytest

from core.errors import UserError
from tests.conftest import REPO
from zeray import __version__
from zeray.cli import EXAMPLES, _parser
from zeray.config import load_config

PAGES = [os.path.join(REPO, "README.md"), *sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))]


def shown_commands(page: str) -> list[tuple[list[str], str | None]]:
    """(argv after `zeray`, the error line printed under it or None) for each zeray command in a fenced block."""
    with open(page, encoding="utf-8") as f:
        blocks = re.findall(r"^ *```[a-z]*\n(.*?)^ *```", f.read(), re.S | re.M)
    found = []
    for block in blocks:
        lines = block.replace("\\\n", " ").splitlines()
        for i, line in enumerate(lines):
            line = line.strip().removeprefix("$ ")
            if "zeray " not in line or line.startswith(("#", "error:", "name:")):
                continue
            words = shlex.split(line.replace("$PWD", REPO), comments=True)
            for start, word in enumerate(words):  # `zeray ...`, `python -m zeray ...`, `RAY_ADDRESS=... zeray ...`
                if word == "zeray" and (start == 0 or "=" in words[start - 1] or words[start - 1] == "-m"):
                    argv = words[start + 1 :]
                    below = lines[i + 1].strip() if i + 1 < len(lines) else ""
                    found.append((argv, below if below.startswith("error: ") else None))
                    break
    return found


def test_the_pages_show_commands_to_check():
    commands = [argv for page in PAGES for argv, _ in shown_commands(page)]
    assert len(commands) >= 20  # the extraction finds them (README alone shows over a dozen)
    assert {argv[0] for argv in commands} >= {"train", "plan", "prep", "eval", "export", "generate", "tune", "submit"}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: os.path.relpath(p, REPO))
def test_every_command_shown_parses_and_its_config_loads(page, monkeypatch):
    check(page, shown_commands(page), monkeypatch)


def test_every_command_has_an_example_in_its_help_that_parses(monkeypatch, capsys):
    parser = _parser()
    commands = parser._subparsers._group_actions[0].choices
    assert set(EXAMPLES) == set(commands)
    for name, sub in commands.items():
        assert all(f"  {example}" in sub.format_help() for example in EXAMPLES[name])
    check("zeray --help", [(shlex.split(e)[1:], None) for examples in EXAMPLES.values() for e in examples], monkeypatch)
    with pytest.raises(SystemExit) as done:
        parser.parse_args(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out == f"zeray {__version__}\n"


def check(page: str, commands: list[tuple[list[str], str | None]], monkeypatch) -> None:
    monkeypatch.chdir(REPO)  # the pages' paths are relative to the project
    parser = _parser()
    for argv, error in commands:
        command, job = argv, []
        if "--" in argv:  # `zeray submit CONFIG -- COMMAND`: the job's command is checked on its own
            at = argv.index("--")
            command, job = argv[:at], argv[at + 1 :]
        try:
            args = parser.parse_args(command)
        except SystemExit:
            pytest.fail(f"{os.path.basename(page)}: `zeray {shlex.join(argv)}` does not parse")
        if job[:1] == ["zeray"]:
            parser.parse_args(job[1:])
        config = getattr(args, "config", None)
        if not (config and os.path.isfile(config)):
            continue  # a placeholder (configs/x.yaml)
        if error:
            with pytest.raises(UserError) as raised:
                load_config(config, args.overrides, check_paths=False)
            assert f"error: {raised.value}" == error
        else:
            load_config(config, getattr(args, "overrides", []), check_paths=False)
