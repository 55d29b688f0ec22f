"""Every supported file type reads into the same `{source, line, raw}` rows, with the right line numbers."""

import csv
import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.errors import UserError
from pipelines.dataset import detect_file_format
from pipelines.formats import normalize
from pipelines.sources import first_records, read_records, resolve_files

RECORDS = [
    {
        "messages": [
            {"role": "user", "content": f'question {i}, with "quotes"\nand lines'},
            {"role": "assistant", "content": f"答案 {i}"},
        ]
    }
    for i in range(25)
]
ALPACA = [
    {
        "instruction": f"say {i}" + ("\nplease" if i % 3 == 0 else ""),
        "input": "" if i % 2 else "context",
        "output": str(i),
    }
    for i in range(25)
]


def read_all(path):
    opened = pa.OSFile(path) if path.endswith((".parquet", ".arrow")) else pa.input_stream(path, compression="detect")
    with opened as f:
        rows = [row for block in read_records(f, path) for row in block.to_pylist()]
    return [(r["line"], json.loads(r["raw"])) for r in rows]


def write(path, text: str):
    data = text.encode("utf-8")
    if str(path).endswith(".gz"):
        data = gzip.compress(data)
    if str(path).endswith(".zst"):
        with pa.output_stream(str(path), compression="zstd") as out:
            out.write(data)
        return str(path)
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_jsonl_line_numbers_skip_blank_lines(tmp_path, suffix):
    lines = [json.dumps(r, ensure_ascii=False) for r in RECORDS]
    lines.insert(3, "")  # a blank line is not a record but still counts as a line
    path = write(tmp_path / f"d{suffix}", "\n".join(lines) + "\n")
    rows = read_all(path)
    assert [r for _, r in rows] == RECORDS
    assert [n for n, _ in rows] == list(range(1, 4)) + list(range(5, 27))


@pytest.mark.parametrize("suffix", [".json", ".json.gz"])
def test_json_list(tmp_path, suffix):
    path = write(tmp_path / f"d{suffix}", json.dumps(RECORDS, ensure_ascii=False, indent=1))
    rows = read_all(path)
    assert rows == list(zip(range(1, 26), RECORDS))


def test_json_list_with_invalid_utf8_in_one_record_keeps_the_others(tmp_path):
    """Bytes that are not UTF-8 inside one record's string spoil that record only: it keeps its position and its
    original bytes (parsing rejects it as invalid_utf8); the others read as they are."""
    items = [json.dumps(r, ensure_ascii=False).encode() for r in RECORDS[:5]]
    items[2] = items[2].replace("答案".encode(), b"\xff\xfe")
    path = tmp_path / "d.json"
    path.write_bytes(b"[" + b",\n".join(items) + b"]")
    with pa.input_stream(str(path)) as f:
        rows = [row for block in read_records(f, str(path)) for row in block.to_pylist()]
    assert [r["line"] for r in rows] == [1, 2, 3, 4, 5]
    assert [json.loads(rows[i]["raw"]) for i in (0, 1, 3, 4)] == [RECORDS[i] for i in (0, 1, 3, 4)]
    assert rows[2]["raw"] == items[2]  # as it was in the file, invalid bytes included


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-32"])
def test_a_json_list_in_utf16_or_utf32_reads_as_json_itself_would(tmp_path, encoding):
    """Windows PowerShell's `ConvertTo-Json | Out-File` writes UTF-16: the encoding json.loads detects is used."""
    path = tmp_path / "d.json"
    path.write_bytes(json.dumps(RECORDS[:3], ensure_ascii=False).encode(encoding))
    assert read_all(str(path)) == list(zip(range(1, 4), RECORDS[:3]))


@pytest.mark.parametrize("name", ["d.jsonl", "d.json", "d.csv"])
def test_a_byte_order_mark_is_not_part_of_the_first_record(tmp_path, name):
    """Files saved by Windows tools start with a UTF-8 byte order mark; the first record (or CSV header) reads
    as if it were not there."""
    if name.endswith(".csv"):
        text = "instruction,input,output\nsay 1,,1\n"
        expected = [(2, {"instruction": "say 1", "input": "", "output": "1"})]
    elif name.endswith(".jsonl"):
        text = "\n".join(json.dumps(r, ensure_ascii=False) for r in RECORDS[:2]) + "\n"
        expected = [(1, RECORDS[0]), (2, RECORDS[1])]
    else:
        text = json.dumps(RECORDS[:2], ensure_ascii=False)
        expected = [(1, RECORDS[0]), (2, RECORDS[1])]
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    assert read_all(str(path)) == expected


@pytest.mark.parametrize("text", ['[{"messages": ', "[" * 100_000 + "]" * 100_000])  # cut short; too deep
def test_broken_json_file_is_one_unparsable_record(tmp_path, text):
    path = write(tmp_path / "bad.json", text)
    with pa.input_stream(path) as f:
        rows = [row for block in read_records(f, path) for row in block.to_pylist()]
    assert [(r["line"], r["raw"]) for r in rows] == [(0, text.encode())]


def test_parquet_with_nested_messages(tmp_path):
    path = str(tmp_path / "d.parquet")
    pq.write_table(pa.Table.from_pylist(RECORDS), path, row_group_size=7)
    rows = read_all(path)
    assert rows == list(zip(range(1, 26), RECORDS))


@pytest.mark.parametrize("suffix", [".csv", ".csv.gz"])
def test_csv_alpaca_and_messages_cells(tmp_path, suffix):
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["instruction", "input", "output"])
    writer.writeheader()
    writer.writerows(ALPACA)
    path = write(tmp_path / f"a{suffix}", buf.getvalue())
    rows = read_all(path)
    assert [r for _, r in rows] == ALPACA
    # a record with a newline inside a quoted cell spans two lines: numbers follow the file's own lines
    expected, line = [], 2
    for record in ALPACA:
        expected.append(line)
        line += 1 + record["instruction"].count("\n")
    assert [n for n, _ in rows] == expected

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["messages"])
    writer.writeheader()
    writer.writerows({"messages": json.dumps(r["messages"], ensure_ascii=False)} for r in RECORDS)
    path = write(tmp_path / f"m{suffix}", buf.getvalue())
    rows = read_all(path)
    assert [n for n, _ in rows] == list(range(2, 27))
    assert [normalize(r, "messages") for _, r in rows] == [r["messages"] for r in RECORDS]


def test_csv_invalid_utf8_survives_as_invalid_bytes(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_bytes(b"text\nfine\n\xff\xfe broken\n")
    rows = [row for block in read_records(pa.input_stream(str(path)), str(path)) for row in block.to_pylist()]
    assert json.loads(rows[0]["raw"]) == {"text": "fine"}
    with pytest.raises(UnicodeDecodeError):
        rows[1]["raw"].decode("utf-8")


def test_hugging_face_dataset_dirs(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(RECORDS)
    ds.save_to_disk(str(tmp_path / "hf"))
    files = resolve_files(str(tmp_path / "hf"))
    assert len(files) == 1 and files[0].endswith(".arrow")
    assert read_all(files[0]) == list(zip(range(1, 26), RECORDS))

    datasets.DatasetDict({"train": ds, "test": ds.select(range(3))}).save_to_disk(str(tmp_path / "hfdict"))
    files = resolve_files(str(tmp_path / "hfdict"))
    assert "train" in files[0] and len(read_all(files[0])) == 25

    datasets.DatasetDict({"validation": ds}).save_to_disk(str(tmp_path / "notrain"))
    with pytest.raises(UserError, match="has no `train` split"):
        resolve_files(str(tmp_path / "notrain"))


def test_resolve_and_detect(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "a.jsonl", json.dumps(ALPACA[0]) + "\n")
    write(tmp_path / "b.csv", "text\nhello\n")
    (tmp_path / "notes.txt").write_text("ignored in a directory")
    files = resolve_files(str(tmp_path))
    assert [f.rsplit("/", 1)[1] for f in files] == ["b.csv", "a.jsonl"]
    assert detect_file_format([files[1]]) == "alpaca"
    assert detect_file_format([files[0]]) == "text"
    with pytest.raises(UserError, match="notes.txt is not a supported file type"):
        resolve_files(str(tmp_path / "notes.txt"))
    with pytest.raises(UserError, match="does not exist"):
        resolve_files(str(tmp_path / "missing.jsonl"))
    assert first_records(files[1], 5) == [json.dumps(ALPACA[0]).encode()]
