"""Property-based fuzzing of what users hand zeray: config files (random keys, types, values, broken YAML) and data
files (random bytes, truncated JSON, wrong shapes, huge lines, invalid UTF-8, mixed formats).

A config is either accepted or refused with one line naming the file (exit code 2): never another exception. Every
record a data file holds comes out of reading and parsing exactly once, kept or rejected with a known reason.
"""

import gzip
import io
import json
import string

import pyarrow as pa
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipelines.dataset import parse_batch
from pipelines.formats import FORMATS
from pipelines.sources import read_records
from zeray.cli import main

REASONS = {"invalid_utf8", "unparsable", "wrong_shape", "unknown_role", "empty_content", "no_assistant_turn"}
SECTIONS = ["name", "storage", "data", "model", "train", "cluster", "tune"]
KEYS = {
    "data": [
        "train",
        "format",
        "max_length",
        "packing",
        "split",
        "dedup",
        "overlong",
        "loss_on",
        "batch_size",
        "tokenizer_actors",
        "prepared",
    ],
    "model": ["name_or_path", "trust_remote_code", "dtype"],
    "train": [
        "num_workers",
        "zero_stage",
        "offload",
        "precision",
        "lr",
        "micro_batch_size",
        "grad_accum",
        "epochs",
        "max_steps",
        "use_gpu",
        "deepspeed",
        "placement_strategy",
        "warmup_ratio",
        "eval_every",
    ],
    "cluster": ["address", "num_cpus", "data_cpus", "placement_timeout_s", "shared_storage", "dashboard_host"],
    "tune": ["search", "scheduler", "num_samples", "space", "metric", "mode", "max_concurrent"],
}
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=True),
    st.text(max_size=30),
    st.sampled_from(["auto", "cpu", "bf16", "PACK", "grid", "asha", "-1", "1e9"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)),
    max_leaves=12,
)


@st.composite
def config_documents(draw) -> dict:
    """Mostly-plausible configs: real sections and keys with random values, plus unknown keys and wrong shapes."""
    doc = {}
    for section in draw(st.lists(st.sampled_from(SECTIONS), unique=True, max_size=len(SECTIONS))):
        if section in KEYS and draw(st.booleans()):
            keys = draw(st.lists(st.sampled_from(KEYS[section] + ["bogus"]), unique=True, max_size=5))
            doc[section] = {key: draw(values) for key in keys}
        else:
            doc[section] = draw(values)
    return doc


class Accepted(Exception):
    """The command got past its config: it would start Ray now."""


@pytest.fixture
def accepting(monkeypatch):
    """`zeray prep` stops where a valid config would start Ray (or reach a ray:// cluster)."""
    import cluster.client
    import cluster.local

    def accepted(*args, **kwargs):
        raise Accepted

    monkeypatch.setattr(cluster.local, "ray_session", accepted)
    monkeypatch.setattr(cluster.client, "run_through_client", accepted)


def _answered_in_one_line(path: str, capsys, overrides: list[str] = ()) -> None:
    """The real command line on the file: accepted, or exit 2 with one `error:` line that names the file, the
    override, or the key (with its path) at fault."""
    capsys.readouterr()
    try:
        code = main(["prep", path, *overrides])
    except Accepted:
        return
    err = capsys.readouterr().err
    assert code == 2, (code, err)
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    message = err[len("error: ") :]
    assert (
        path in message
        or "override" in message
        or message.startswith(("data.train: ", "data.prepared: ", "model.name_or_path: ", "train.deepspeed: "))
    ), err


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    doc=config_documents(),
    # (an argument that starts with "-" is an option: argparse answers it with its usage)
    overrides=st.lists(st.text(string.printable, max_size=30).filter(lambda s: not s.startswith("-")), max_size=3),
)
@pytest.mark.reliability(
    "bad input", "random configs: real and unknown keys, random types and values, random `k=v` overrides"
)
def test_random_configs_are_accepted_or_refused_in_one_line(tmp_path, accepting, capsys, doc, overrides):
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True))
    _answered_in_one_line(str(path), capsys, overrides)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    content=st.one_of(
        st.binary(max_size=300),
        st.text(max_size=300).map(str.encode),
        st.sampled_from(
            [
                b"train: [",
                b"data: {train: x",
                b"\t- a",
                b"a: b: c",
                b"--- !!python/object:os.system ls",
                b"\xff\xfe",
                b"key: &a [*a]",
                b"? [a]\n: b",
            ]
        ),
    )
)
@pytest.mark.reliability(
    "bad input", "broken YAML: random bytes and text, unclosed brackets, tabs, python tags, recursive anchors"
)
def test_broken_yaml_is_refused_in_one_line(tmp_path, accepting, capsys, content):
    path = tmp_path / "broken.yaml"
    path.write_bytes(content)
    _answered_in_one_line(str(path), capsys)


@pytest.mark.reliability("bad input", "a bad config given to every command")
def test_the_cli_answers_a_bad_config_with_exit_2(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("data: {train: [1, 2]}\ntrain: {zero_stage: 7}\n")
    for command in (["train"], ["prep"], ["plan"], ["tune"], ["eval", "--model", str(tmp_path)]):
        assert main([*command, str(path)]) == 2, command
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err


# --- data files -----------------------------------------------------------------------------------------------

turn = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["user", "assistant", "system", "robot", ""]),
        "content": st.one_of(st.text(max_size=20), st.integers(), st.none()),
    }
)
record = st.one_of(
    st.fixed_dictionaries({"messages": st.lists(turn, max_size=4)}),
    st.fixed_dictionaries(
        {
            "conversations": st.lists(
                st.fixed_dictionaries(
                    {"from": st.sampled_from(["human", "gpt", "system", "x"]), "value": st.text(max_size=20)}
                ),
                max_size=4,
            )
        }
    ),
    st.fixed_dictionaries({"instruction": st.text(max_size=20), "output": st.text(max_size=20)}),
    st.fixed_dictionaries({"text": st.text(max_size=20)}),
    values,
)


@st.composite
def jsonl_lines(draw) -> list[bytes]:
    """Lines as users' files have them: good and bad records, truncated JSON, raw bytes, huge and blank lines."""
    lines = []
    for _ in range(draw(st.integers(0, 12))):
        kind = draw(st.sampled_from(["record", "truncated", "bytes", "huge", "blank", "latin1", "surrogate", "deep"]))
        text = json.dumps(draw(record), ensure_ascii=draw(st.booleans())).encode()
        if kind == "truncated":
            text = text[: draw(st.integers(0, max(0, len(text) - 1)))]
        elif kind == "bytes":
            text = draw(st.binary(max_size=40))
        elif kind == "huge":
            text = json.dumps(
                {"messages": [{"role": "user", "content": "x" * 300_000}, {"role": "assistant", "content": "y"}]}
            ).encode()
        elif kind == "blank":
            text = b"   "
        elif kind == "latin1":
            text = '{"text": "caf\u00e9"}'.encode("latin-1")
        elif kind == "surrogate":  # valid UTF-8, but half a surrogate pair escaped in the JSON
            text = b'{"messages": [{"role": "user", "content": "a\\ud83d"}, {"role": "assistant", "content": "b"}],'
            text += b' "text": "\\udc00", "instruction": "i", "output": "o"}'
        elif kind == "deep":  # deeper than Python's JSON parser recurses
            text = b"[" * 20_000 + b"]" * 20_000
        lines.append(text.replace(b"\n", b" ").replace(b"\r", b" "))
    return lines


def _parsed(content: bytes, path: str, fmt: str) -> list[dict]:
    opened = pa.input_stream(pa.BufferReader(content), compression="gzip" if path.endswith(".gz") else None)
    blocks = list(read_records(opened, path))
    rows = [parse_batch(block, {path: fmt}, 0.1, 0.1, 0).to_pylist() for block in blocks]
    return [row for block in rows for row in block]


def _accounted(rows: list[dict]) -> None:
    for row in rows:
        assert row["reject"] in REASONS | {""}, row
        if row["reject"]:
            assert row["split"] == "" and row["conversation"] == ""
        else:
            assert row["split"] in ("train", "val", "test") and json.loads(row["conversation"])


@settings(max_examples=200, deadline=None)
@given(lines=jsonl_lines(), fmt=st.sampled_from(sorted(FORMATS)), gz=st.booleans(), bom=st.booleans())
@pytest.mark.reliability(
    "bad input",
    "random JSONL (plain and gzip, with or without a byte order mark): truncated JSON, raw bytes, huge lines, "
    "Latin-1, escaped lone surrogates, deep nesting, blank lines, every format",
)
def test_every_jsonl_line_is_kept_or_rejected_once(lines, fmt, gz, bom):
    content = b"\xef\xbb\xbf" * bom + b"\n".join(lines) + b"\n"
    path = "fuzz.jsonl.gz" if gz else "fuzz.jsonl"
    rows = _parsed(gzip.compress(content) if gz else content, path, fmt)
    records = [i + 1 for i, line in enumerate(lines) if line.strip()]
    assert [row["line"] for row in rows] == records
    _accounted(rows)


@settings(max_examples=200, deadline=None)
@given(
    records=st.lists(record, max_size=8),
    mangle=st.sampled_from(["none", "truncate", "bytes", "object"]),
    fmt=st.sampled_from(sorted(FORMATS)),
    data=st.data(),
)
@pytest.mark.reliability("bad input", "random .json files: lists, objects, truncated, raw bytes")
def test_a_json_file_is_its_records_or_one_reject(records, mangle, fmt, data):
    content = json.dumps(records).encode()
    if mangle == "truncate":
        content = content[: data.draw(st.integers(0, max(0, len(content) - 1)))]
    elif mangle == "bytes":
        content = data.draw(st.binary(max_size=60))
    elif mangle == "object":
        content = json.dumps({"data": records}).encode()
    rows = _parsed(content, "fuzz.json", fmt)
    try:
        # the encoding json itself detects; in UTF-8, bytes that are not UTF-8 spoil only the record whose string
        # holds them, not the file's structure
        encoding = json.detect_encoding(content)
        parsed = json.loads(
            content.decode("utf-8-sig", "surrogateescape") if encoding.startswith("utf-8") else content.decode(encoding)
        )
        expected = len(parsed) if isinstance(parsed, list) else 1
    except ValueError:
        expected = 1  # the whole file, rejected as unparsable
        assert [row["reject"] for row in rows] in (["unparsable"], ["invalid_utf8"]), rows
    assert len(rows) == expected
    _accounted(rows)


@settings(max_examples=200, deadline=None)
@given(
    header=st.lists(
        st.sampled_from(["messages", "instruction", "input", "output", "text", "x", ""]), min_size=1, max_size=4
    ),
    cells=st.lists(st.lists(st.text(max_size=15), min_size=0, max_size=5), max_size=6),
    fmt=st.sampled_from(sorted(FORMATS)),
    tail=st.binary(max_size=20),
)
@pytest.mark.reliability("bad input", "random CSV: any header, ragged rows, trailing raw bytes")
def test_every_csv_row_is_kept_or_rejected_once(header, cells, fmt, tail):
    import csv

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(cells)
    content = buffer.getvalue().encode("utf-8", "surrogatepass")
    # every row the writer wrote is a record (an empty row is a blank line, no record)
    written = _parsed(content, "fuzz.csv", fmt)
    assert len(written) == sum(1 for row in cells if row)
    rows = _parsed(content + tail, "fuzz.csv", fmt)
    _accounted(rows)
    lines = [row["line"] for row in rows]
    assert lines == sorted(set(lines)) and all(line >= 2 for line in lines)
    # trailing bytes add records after those rows (as many as their lines at most), never lose one of them
    assert [row["line"] for row in rows[: len(written)]] == [row["line"] for row in written]
    assert len(written) <= len(rows) <= len(written) + tail.count(b"\n") + tail.count(b"\r") + 1


# --- the real command on a directory of such files -----------------------------------------------------------


def _adversarial_directory(folder, seed: int) -> None:
    """Every file type, good and bad records mixed (deterministic by seed)."""
    import csv
    import random

    import pyarrow.parquet as pq

    rng = random.Random(seed)
    folder.mkdir()
    bad = [
        {"messages": "hi"},
        {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},
        {"messages": [{"role": "user", "content": "only"}]},
        {"conversations": [{"from": "gpt", "value": " "}]},
        [1, 2],
        None,
        {"text": 5},
        {"instruction": "", "output": ""},
        "string",
        {"messages": [{"content": "x"}]},
    ]
    lines = []
    for i in range(60):
        example = (
            rng.choice(bad)
            if i % 3 == 0
            else {"messages": [{"role": "user", "content": f"q{seed}-{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        )
        lines.append(json.dumps(example).encode())
    lines[5], lines[17] = (
        lines[5][: len(lines[5]) // 2],
        bytes(rng.randrange(256) for _ in range(30)).replace(b"\n", b""),
    )
    (folder / "a.jsonl").write_bytes(b"\n".join(line.replace(b"\n", b" ") for line in lines) + b"\n")
    (folder / "b.jsonl.gz").write_bytes(gzip.compress(b"\n".join(lines[::-1]) + b"\n"))
    (folder / "c.json").write_text(json.dumps([json.loads(line) for line in lines[20:40] if _loads(line)]))
    (folder / "d.json").write_bytes(b'[{"messages": [')  # truncated: one unparsable record
    with open(folder / "e.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["instruction", "input", "output"])
        writer.writerows([[f"do {i}", "", "done" if i % 4 else ""] for i in range(25)])
    pq.write_table(pa.table({"text": [f"plain {seed} {i}" for i in range(10)] + [None]}), folder / "f.parquet")


def _loads(line: bytes):
    try:
        return json.loads(line)
    except ValueError:
        return None


@pytest.mark.integration
@pytest.mark.reliability("bad input", "`zeray prep` on a directory mixing every file type and format with bad records")
def test_prep_on_adversarial_files_exits_0_and_accounts_for_every_record(ray_cluster, artifacts, tmp_path):
    from conftest import write_config

    seed = 1
    root = tmp_path / f"s{seed}"
    root.mkdir()
    _adversarial_directory(root / "data", seed)
    config = write_config(
        root / "prep.yaml",
        name="fuzz",
        storage=str(root / "runs"),
        data={"train": str(root / "data"), "format": "auto", "max_length": 64},
        model={"name_or_path": artifacts["model"]},
    )
    assert main(["prep", config]) == 0
    out = root / "runs" / "fuzz" / "data"
    report = json.loads((out / "report.json").read_text())
    rejected = sum(report["rejected"].values())
    assert report["records_in"] == sum(report["records"].values()) + rejected
    with open(out / "rejects.jsonl", encoding="utf-8") as f:
        rejects = [json.loads(line) for line in f]
    assert len(rejects) == rejected and rejected > 0
    assert {r["source"].rsplit("/", 1)[-1] for r in rejects} >= {"a.jsonl", "d.json"}
    # records in: 60 + 60 lines, the .json list's, 1 for the broken .json, 25 CSV rows, 11 Parquet rows
    listed = len(json.loads((root / "data" / "c.json").read_text()))
    assert report["records_in"] == 60 + 60 + listed + 1 + 25 + 11


@pytest.mark.integration
@pytest.mark.reliability("bad input", "a truncated .jsonl.gz beside good data")
def test_a_corrupt_compressed_file_is_refused_naming_it(ray_cluster, artifacts, tmp_path, capsys):
    from conftest import write_config

    data = tmp_path / "data"
    data.mkdir()
    (data / "good.jsonl").write_text(
        json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}) + "\n"
    )
    full = gzip.compress(b"".join(json.dumps({"text": f"{i} " * 50}).encode() + b"\n" for i in range(3000)))
    (data / "cut.jsonl.gz").write_bytes(full[: len(full) // 2])
    config = write_config(
        tmp_path / "prep.yaml",
        name="corrupt",
        storage=str(tmp_path / "runs"),
        data={"train": str(data), "format": "auto"},
        model={"name_or_path": artifacts["model"]},
    )
    capsys.readouterr()
    assert main(["prep", config]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: data.train: ") and "cut.jsonl.gz" in err, err
    assert not (tmp_path / "runs" / "corrupt" / "data").exists()  # nothing half-written
