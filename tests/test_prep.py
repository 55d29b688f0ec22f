"""`zeray prep` on a dirty file: every defect is counted by reason and written to rejects.jsonl, the accounting
identity holds, and `zeray train` can train from the prepared folder."""

import json
import os

import pyarrow.parquet as pq
import pytest
from conftest import write_config

from zeray.cli import main

pytestmark = pytest.mark.integration


@pytest.mark.reliability(
    "bad input",
    "a dirty JSONL (byte order mark first) with one of each defect (unparsable, shapes, roles, empty, duplicate, "
    "too long, invalid UTF-8, escaped lone surrogate)",
)
def test_prep_accounts_for_every_record_and_train_reuses_it(ray_cluster, artifacts, tmp_path):
    unique = {}
    for line in open(artifacts["data"], encoding="utf-8"):  # chatterbot repeats itself: keep distinct ones
        record = json.loads(line)
        if len(line.encode("utf-8")) > 220:  # short ones only: none may be over max_length (< 1 token per byte)
            continue
        unique.setdefault(json.dumps(record["messages"], sort_keys=True), record)
    lines = [json.dumps(r, ensure_ascii=False) for r in list(unique.values())[:400]]
    defects = {  # line index -> expected reason
        3: ("{broken", "unparsable"),
        50: (json.dumps({"messages": [{"role": "user", "content": "just asking"}]}), "no_assistant_turn"),
        51: (
            json.dumps({"messages": [{"role": "bot", "content": "a"}, {"role": "assistant", "content": "b"}]}),
            "unknown_role",
        ),
        52: (
            json.dumps({"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "b"}]}),
            "empty_content",
        ),
        99: (json.dumps(["not", "an", "object"]), "wrong_shape"),
        # valid UTF-8 whose JSON escapes half a surrogate pair
        120: (
            '{"messages": [{"role": "user", "content": "a\\udc80"}, {"role": "assistant", "content": "b"}]}',
            "invalid_utf8",
        ),
        200: (lines[10], "duplicate"),  # the same conversation again, 190 lines later
        300: (
            json.dumps(
                {"messages": [{"role": "user", "content": "tell me " * 300}, {"role": "assistant", "content": "no"}]}
            ),
            "too_long",
        ),
    }
    for index, (text, _) in defects.items():
        lines[index] = text
    data = tmp_path / "dirty.jsonl"
    # a byte order mark first (the first record stays good), and one line of invalid UTF-8 last
    raw = b"\xef\xbb\xbf" + "\n".join(lines).encode("utf-8") + b"\n" + b'{"messages": "\xff\xfe"}\n'
    data.write_bytes(raw)

    config = write_config(
        tmp_path / "prep.yaml",
        name="prep",
        storage=str(tmp_path / "runs"),
        data={"train": str(data), "format": "messages", "max_length": 256},
        model={"name_or_path": artifacts["model"]},
        train={"num_workers": 2, "max_steps": 3, "micro_batch_size": 4, "eval_every": 100, "log_every": 1},
    )
    assert main(["prep", config]) == 0
    out = tmp_path / "runs" / "prep" / "data"
    report = json.loads((out / "report.json").read_text())
    assert report["records_in"] == 401
    assert report["rejected"] == {
        "unparsable": 1,
        "no_assistant_turn": 1,
        "unknown_role": 1,
        "empty_content": 1,
        "wrong_shape": 1,
        "invalid_utf8": 2,
        "duplicate": 1,
        "too_long": 1,
    }
    assert report["records_out"] == 392 == sum(report["records"].values())
    assert report["records_in"] == report["records_out"] + sum(report["rejected"].values())
    assert 0.7 < report["records"]["train"] / 392 < 0.9
    # packed: fewer rows than records, each at most max_length, mostly full
    assert report["packing"] and report["rows"]["train"] < report["records"]["train"] / 2
    assert report["packing_efficiency"]["train"] > 0.8
    assert report["packing_efficiency"]["train"] == round(
        report["tokens"]["train"] / (report["rows"]["train"] * 256), 4
    )
    assert sum(report["length_histogram"].values()) == sum(report["rows"].values())

    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert sorted((r["line"], r["reason"]) for r in rejects) == sorted(
        [(i + 1, reason) for i, (_, reason) in defects.items()] + [(401, "invalid_utf8")]
    )
    assert all(r["source"] == str(data) for r in rejects)
    assert next(r for r in rejects if r["reason"] == "unparsable")["record"] == "{broken"
    assert next(r for r in rejects if r["reason"] == "duplicate")["detail"] == f"same conversation as {data}:11"

    for split in ("train", "val", "test"):
        table = pq.read_table(out / split)
        assert table.num_rows == report["rows"][split]
        assert sum(table.column("num_tokens").to_pylist()) == report["tokens"][split]
        assert max(table.column("num_tokens").to_pylist()) <= 256
        # every record starts a sequence at position 0
        assert sum(p.count(0) for p in table.column("position_ids").to_pylist()) == report["records"][split]

    # a second prep replaces the first whole: the very same report and rows, no duplicated rows, no leftovers
    tables = {split: pq.read_table(out / split).to_pylist() for split in ("train", "val", "test")}
    assert main(["prep", config]) == 0
    assert json.loads((out / "report.json").read_text()) == report
    assert {split: pq.read_table(out / split).to_pylist() for split in tables} == tables
    assert pq.read_table(out / "train").num_rows == report["rows"]["train"]
    assert not [p for p in os.listdir(out.parent) if ".tmp-" in p]

    assert main(["train", config, f"data.prepared={out}", "data.train=null"]) == 0
    summary = json.loads((tmp_path / "runs" / "prep" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["records"]["rows"]["train"] == report["rows"]["train"]


def test_a_weighted_mixture_draws_each_source_by_its_weight_and_accounts_for_every_record(
    ray_cluster, artifacts, tmp_path, capsys
):
    """Two sources in two formats, one weighted three times the other: each source's records are accounted for
    on their own, the epoch draws the sources' training records in the ratio of their weights (within sampling
    error: the smaller source is repeated, the larger sampled), and the training rows hold exactly the tokens
    drawn."""
    import math

    lines = open(artifacts["data"], encoding="utf-8").read().splitlines()
    (tmp_path / "chat.jsonl").write_text("\n".join(lines[:1800]) + "\n", encoding="utf-8")
    role = {"user": "human", "assistant": "gpt", "system": "system"}
    sharegpt = [
        {"conversations": [{"from": role[t["role"]], "value": t["content"]} for t in json.loads(line)["messages"]]}
        for line in lines[1800:]
    ]
    (tmp_path / "other.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sharegpt), encoding="utf-8")
    sources = [
        {"path": str(tmp_path / "chat.jsonl"), "weight": 1},
        {"path": str(tmp_path / "other.jsonl"), "weight": 3},
    ]
    config = write_config(
        tmp_path / "mix.yaml",
        name="mix",
        storage=str(tmp_path / "runs"),
        data={"train": sources, "max_length": 96},
        model={"name_or_path": artifacts["model"]},
    )
    assert main(["prep", config]) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "runs" / "mix" / "data" / "report.json").read_text())
    chat, other = report["sources"]
    assert (chat["path"], chat["format"], other["format"]) == (sources[0]["path"], "messages", "sharegpt")
    assert chat["records_in"] == 1800 and other["records_in"] == len(lines) - 1800
    for source in (chat, other):  # every record of each source is out or rejected
        assert source["records_in"] == sum(source["records"].values()) + sum(source["rejected"].values())
        assert f"data: source {source['path']} ({source['format']}, weight {source['weight']:g})" in out
    assert report["records_in"] == chat["records_in"] + other["records_in"]
    # the weights' shares of all the training records, each source's draws within 4 standard deviations
    total = chat["records"]["train"] + other["records"]["train"]
    for source, share in ((chat, 0.25), (other, 0.75)):
        rate = total * share / source["records"]["train"]
        spread = math.sqrt(source["records"]["train"] * (rate % 1) * (1 - rate % 1))
        assert abs(source["drawn"] - total * share) <= 4 * spread + 1, (source, total)
    assert other["drawn"] > other["records"]["train"] > chat["records"]["train"] > chat["drawn"]  # (1800 vs 692 lines)
    train = pq.read_table(tmp_path / "runs" / "mix" / "data" / "train")
    drawn_tokens = chat["tokens"] + other["tokens"]
    assert sum(train.column("num_tokens").to_pylist()) == drawn_tokens == report["tokens"]["train"]
    assert chat["token_share"] == round(chat["tokens"] / drawn_tokens, 4) and 0.15 < chat["token_share"] < 0.35
    # every drawn record starts a sequence at position 0
    assert sum(p.count(0) for p in train.column("position_ids").to_pylist()) == chat["drawn"] + other["drawn"]


@pytest.mark.slow
@pytest.mark.reliability("fault", "`zeray prep` SIGKILLed while writing its output, then run again")
def test_prep_killed_while_writing_then_run_again_writes_it_once(ray_cluster, artifacts, tmp_path):
    """A prep killed mid-write (its process group, embedded Ray and all) leaves no `data/` at all, only its
    temporary folder; running it again removes that and writes the same output as any other complete prep: every
    record once, no row twice."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO

    config = write_config(
        tmp_path / "kill.yaml",
        name="kill",
        storage=str(tmp_path / "runs"),
        data={"train": artifacts["data"], "format": "messages", "max_length": 96},
        model={"name_or_path": artifacts["model"]},
    )
    run = tmp_path / "runs" / "kill"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(
            [sys.executable, "-m", "zeray", "prep", config],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 300
    writing = []
    while time.monotonic() < deadline and first.poll() is None and not writing:
        writing = [p for p in run.glob("data.tmp-*/train/*.parquet")] if run.exists() else []
        time.sleep(0.01)
    assert writing and first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert not (run / "data").exists() and sorted(p.name for p in run.iterdir()) == [f"data.tmp-{first.pid}", "logs"]
    # its console held zeray's lines only; Ray's and Ray Data's went to the run's log file
    console = (tmp_path / "first.log").read_text().splitlines()
    assert console[0] == (
        f"logs: {run / 'logs' / 'prep.log'} (Ray's, DeepSpeed's and transformers' output; --verbose shows it here)"
    )
    assert console[1].startswith("zeray prep kill: embedded local Ray (") and console[1].endswith(str(run / "data"))
    assert not [line for line in console if "pid=" in line or "INFO" in line or "WARNING" in line], console
    logged = (run / "logs" / "prep.log").read_text()
    assert "Running Dataset" in logged and "ReadRecordSource" in logged  # Ray Data's progress

    assert main(["prep", config]) == 0
    assert sorted(p.name for p in run.iterdir()) == ["data", "logs"]  # the killed prep's folder is gone
    report = json.loads((run / "data" / "report.json").read_text())
    rows = {s: pq.read_table(run / "data" / s).to_pylist() for s in ("train", "val", "test")}
    assert report["records_in"] == report["records_out"] + sum(report["rejected"].values())
    for split, table in rows.items():
        assert len(table) == report["rows"][split] > 0
        assert len({json.dumps(r["input_ids"]) for r in table}) == len(table), f"a {split} row written twice"
    # (a prep over a complete one gives the very same output: test_prep_accounts_for_every_record_and_train_reuses_it)


def test_prepared_splits_are_read_as_the_blocks_prep_wrote(ray_cluster, prepared_data):
    """The training order's local shuffle depends on where blocks begin and end: a prepared split comes back one
    block per Parquet file, in file order, as the pipeline produced it, not cut up by the cluster's CPUs (a run's
    order would then depend on the cluster it runs on)."""
    import ray

    from pipelines.prep import load_prepared

    datasets, report = load_prepared(prepared_data)
    for split, ds in datasets.items():
        files = sorted(name for name in os.listdir(os.path.join(prepared_data, split)) if name.endswith(".parquet"))
        written = [pq.read_table(os.path.join(prepared_data, split, name)) for name in files]
        blocks = ray.get(ds.get_internal_block_refs())
        assert [b.num_rows for b in blocks] == [t.num_rows for t in written], split
        assert sum(b.num_rows for b in blocks) == report["rows"][split]
        assert [b.column("input_ids").to_pylist() for b in blocks] == [
            t.column("input_ids").to_pylist() for t in written
        ]
