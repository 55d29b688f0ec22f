"""RELIABILITY.md: the table of every fault and bad input the suite inflicts on zeray, how often, and what came of it.

Tests mark themselves `@pytest.mark.reliability(kind, what)`: `kind` is "fault" (a kill, a node lost, a damaged
file, a starved cluster) or "bad input" (fuzzed configs and data, hostile settings). Each such test asserts that
nothing was lost, repeated or corrupted (faults) or that every answer was exit 0 or 2 with every record accounted
for (bad input); it passing is the outcome written here. `./run.sh reliability` runs them and rewrites the file.
"""

import datetime
import os
import platform
import subprocess

import pytest

OUTCOME = {
    "fault": "survived: no example lost or repeated, no corrupt output",
    "bad input": "answered with exit 0 or 2 (one-line error), every record accounted for",
}


def pytest_addoption(parser):
    parser.addoption(
        "--reliability-report",
        metavar="PATH",
        help="write the table of faults and bad inputs tried by tests marked `reliability` to PATH",
    )


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "reliability(kind, what): a fault or bad input inflicted on zeray, reported in RELIABILITY.md"
    )
    config._reliability_rows = {}


def runs(item) -> int:
    """How many times the test inflicts its fault: hypothesis' example budget, the marker's `runs`, else once."""
    settings = getattr(item.obj, "_hypothesis_internal_use_settings", None)
    if settings is not None:
        return settings.max_examples
    marker = item.get_closest_marker("reliability")
    return marker.kwargs.get("runs", 1)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    marker = item.get_closest_marker("reliability")
    if marker is None or (report.when != "call" and report.passed):
        return
    kind, what = marker.args
    assert kind in OUTCOME, f"{item.nodeid}: reliability kind must be one of {sorted(OUTCOME)}"
    rows = item.config._reliability_rows
    failed = rows.get(item.nodeid, {}).get("outcome", "").startswith("FAILED")
    if report.failed or failed:
        outcome = f"FAILED ({report.when})"
    elif report.skipped:
        outcome = "not run (skipped)"
    else:
        outcome = OUTCOME[kind]
    rows[item.nodeid] = {
        "kind": kind,
        "what": what,
        "runs": runs(item),
        "outcome": outcome,
        "seconds": rows.get(item.nodeid, {}).get("seconds", 0.0) + report.duration,
    }


def pytest_sessionfinish(session):
    path = session.config.getoption("--reliability-report")
    rows = session.config._reliability_rows
    if not path or not rows:
        return
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=session.config.rootpath
            ).stdout.strip()
            or "unknown"
        )
    except OSError:
        commit = "unknown"
    ordered = sorted(rows.items(), key=lambda kv: (kv[1]["kind"] != "fault", kv[0]))
    failed = sum(1 for _, row in ordered if not row["outcome"].startswith(("survived", "answered")))
    lines = [
        "# Reliability",
        "",
        "Every fault and bad input the test suite inflicts on zeray, how many times, and the outcome. Regenerate with",
        "`./run.sh reliability` (the tests marked `reliability`; see `tests/reliability_report.py`).",
        "",
        f"Last run: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}: {len(ordered)} faults and bad inputs, "
        f"{sum(row['runs'] for _, row in ordered)} runs in all, {failed} not survived.",
        "",
        "| Kind | What was done | Runs | Outcome | Test | Seconds |",
        "|---|---|---:|---|---|---:|",
    ]
    for nodeid, row in ordered:
        lines.append(
            f"| {row['kind']} | {row['what']} | {row['runs']} | {row['outcome']} | `{nodeid}` | {row['seconds']:.0f} |"
        )
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
