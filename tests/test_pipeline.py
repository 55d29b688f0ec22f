"""The Ray Data pipeline on real files: streamed read with line numbers, rejects, splits, tokens and labels."""

import gzip
import json

import pytest
from ray.data.expressions import col

from pipelines.chat import IGNORE
from pipelines.config import DataConfig
from pipelines.dataset import build_splits, count_records, materialize_in_order

GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}


def write_lines(path, lines, compress=False):
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    if compress:
        data = gzip.compress(data)
    path.write_bytes(data)
    return str(path)


@pytest.mark.integration
def test_counts_rejects_and_tokens(ray_cluster, artifacts, tmp_path):
    lines = []
    for i in range(300):
        rec = {
            "messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
        }
        lines.append(json.dumps(rec))
    lines[10] = "{not json"
    lines[20] = json.dumps({"messages": [{"role": "user", "content": "no reply"}]})
    lines[30] = json.dumps({"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]})
    path = write_lines(tmp_path / "d.jsonl", lines)
    data = DataConfig(train=path, format="messages", max_length=64)
    splits = build_splits(data, artifacts["model"])
    counts = count_records(splits.records)
    assert counts["records_in"] == 300
    assert counts["rejected"] == {"unparsable": 1, "no_assistant_turn": 1, "unknown_role": 1}
    assert sum(counts["records"].values()) == 297
    assert 0.7 < counts["records"]["train"] / 297 < 0.9

    rejects = splits.records.filter(expr=col("reject") != "").take_all()
    assert sorted((r["line"], r["reject"]) for r in rejects) == [
        (11, "unparsable"),
        (21, "no_assistant_turn"),
        (31, "unknown_role"),
    ]
    assert all(r["source"] == path for r in rejects)

    # packed rows: every token of every training record, in sequences of at most max_length
    records = splits.records.filter(expr=(col("reject") == "") & (col("split") == "train")).take_all()
    rows = splits.train.take_all()
    assert len(rows) < len(records)
    assert sum(r["num_tokens"] for r in rows) == sum(r["num_tokens"] for r in records)
    for row in rows:
        assert len(row["input_ids"]) == len(row["labels"]) == len(row["position_ids"]) == row["num_tokens"] <= 64
        assert any(label != IGNORE for label in row["labels"]) and row["labels"][0] == IGNORE
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        assert all(row["labels"][i] == IGNORE for i in starts) and len(starts) >= 1


@pytest.mark.integration
def test_order_and_packing_do_not_depend_on_files_or_blocks(ray_cluster, artifacts, tmp_path):
    """The same records in one file, or shuffled across three files read in other blocks, give the same
    splits and the same training rows in the same order: what reproducible runs and exact resume rest on."""
    import random

    lines = [
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": f"question {i}"},
                    {"role": "assistant", "content": "answer " * (i % 7 + 1)},
                ]
            }
        )
        for i in range(400)
    ]
    one = write_lines(tmp_path / "one.jsonl", lines)
    random.Random(3).shuffle(lines)
    folder = tmp_path / "three"
    folder.mkdir()
    for n, part in enumerate((lines[:50], lines[50:310], lines[310:])):
        write_lines(folder / f"p{n}.jsonl", part)
    a = build_splits(DataConfig(train=one, max_length=128), artifacts["model"])
    b = build_splits(DataConfig(train=str(folder), max_length=128, batch_size=17), artifacts["model"])
    for split in ("train", "val", "test"):
        assert getattr(a, split).take_all() == getattr(b, split).take_all()
    assert count_records(a.records) == count_records(b.records)
    assert 0.75 < count_records(a.records)["records"]["train"] / 400 < 0.85


@pytest.mark.integration
def test_materialized_blocks_keep_their_order_when_the_first_task_finishes_last(ray_cluster):
    """The block order of a materialized split is the data's, not the order its tasks finish in: with the workers
    on two nodes the tasks finished in another order, and the same config trained on other batches."""
    import time

    import ray

    def first_finishes_last(batch):
        if batch["id"][0] == 0:
            time.sleep(2)
        return batch

    ds = ray.data.range(40, override_num_blocks=4).map_batches(first_finishes_last, batch_size=None)
    assert [row["id"] for row in materialize_in_order(ds).take_all()] == list(range(40))


@pytest.mark.integration
def test_overlong_records_are_truncated_or_rejected(ray_cluster, artifacts, tmp_path):
    def turn(i):
        return [{"role": "user", "content": f"q {i}"}, {"role": "assistant", "content": "word " * 12}]

    lines = [
        json.dumps({"messages": turn(0) + turn(1) + turn(2)}),  # truncated after its first reply
        json.dumps({"messages": [{"role": "user", "content": "long " * 200}] + turn(3)}),  # too long
        json.dumps(GOOD),
    ]
    path = write_lines(tmp_path / "long.jsonl", lines)
    splits = build_splits(DataConfig(train=path, max_length=80, dedup=False), artifacts["model"])
    counts = count_records(splits.records)
    assert counts["rejected"] == {"too_long": 1} and counts["truncated"] == 1
    assert sum(counts["records"].values()) == 2
    rows = {r["line"]: r for r in splits.records.take_all()}
    assert rows[2]["reject"] == "too_long" and "over data.max_length 80" in rows[2]["detail"]
    assert json.loads(rows[2]["record"])[0]["content"].startswith("long long")
    assert rows[1]["truncated"] and rows[1]["num_tokens"] <= 80
    splits = build_splits(DataConfig(train=path, max_length=80, overlong="reject"), artifacts["model"])
    assert count_records(splits.records)["rejected"] == {"too_long": 2}


@pytest.mark.integration
def test_gzip_directory_and_auto_format(ray_cluster, artifacts, tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    write_lines(folder / "a.jsonl", [json.dumps(GOOD)] * 5)
    write_lines(folder / "b.jsonl.gz", [json.dumps(GOOD)] * 7, compress=True)
    splits = build_splits(DataConfig(train=str(folder)), artifacts["model"])
    assert splits.format == "messages"
    assert len(splits.files) == 2
    counts = count_records(splits.records)
    assert counts["records_in"] == 12
    assert counts["rejected"] == {"duplicate": 11}  # one conversation, twelve times, across two files
    kept = splits.records.filter(expr=col("reject") == "").take_all()
    assert [(r["source"].endswith("a.jsonl"), r["line"]) for r in kept] == [(True, 1)]
    dups = splits.records.filter(expr=col("reject") == "duplicate").take_all()
    assert {r["detail"] for r in dups} == {f"same conversation as {folder / 'a.jsonl'}:1"}


@pytest.mark.integration
def test_conversations_the_chat_template_refuses_are_rejected_not_fatal(ray_cluster, artifacts, tmp_path):
    """Many models' templates raise on roles that do not alternate (or on a system turn): those conversations are
    rejected with the template's message, the rest are trained on."""
    import shutil

    model = shutil.copytree(artifacts["model"], tmp_path / "strict-model")
    template = model / "chat_template.jinja"
    template.write_text(
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
        "{% endfor %}" + template.read_text()
    )
    lines = [
        json.dumps({"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]})
        for i in range(40)
    ]
    lines[7] = json.dumps(
        {
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "user", "content": "again"},
                {"role": "assistant", "content": "a"},
            ]
        }
    )
    splits = build_splits(DataConfig(train=write_lines(tmp_path / "d.jsonl", lines), format="messages"), str(model))
    counts = count_records(splits.records)
    assert counts["rejected"] == {"template_error": 1} and sum(counts["records"].values()) == 39
    [refused] = splits.records.filter(expr=col("reject") == "template_error").take_all()
    assert refused["line"] == 8 and refused["detail"].endswith("Conversation roles must alternate user/assistant")
    assert json.loads(refused["record"])[1] == {"role": "user", "content": "again"}


@pytest.mark.integration
def test_duplicates_are_found_however_large_the_sorted_blocks(ray_cluster, artifacts, tmp_path, monkeypatch):
    """Ray Data cuts a sort's output into blocks of at most `target_max_block_size` before the next map sees them;
    every copy of a conversation must still meet its first (here blocks of 4 KiB would cut the run of copies)."""
    import ray.data

    monkeypatch.setattr(ray.data.DataContext.get_current(), "target_max_block_size", 4096)
    lines = [json.dumps(GOOD)] * 60 + [
        json.dumps({"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]})
        for i in range(60)
    ]
    splits = build_splits(DataConfig(train=write_lines(tmp_path / "d.jsonl", lines)), artifacts["model"])
    counts = count_records(splits.records)
    assert counts["rejected"] == {"duplicate": 59}
    assert sum(counts["records"].values()) == 61


@pytest.mark.integration
def test_alpaca_and_sharegpt_files(ray_cluster, artifacts, tmp_path):
    alpaca = write_lines(
        tmp_path / "a.jsonl", [json.dumps({"instruction": f"say {i}", "output": str(i)}) for i in range(40)]
    )
    splits = build_splits(DataConfig(train=alpaca), artifacts["model"])
    assert splits.format == "alpaca"
    counts = count_records(splits.records)
    assert sum(counts["records"].values()) == 40 and counts["rejected"] == {}
    share = write_lines(
        tmp_path / "s.jsonl",
        [
            json.dumps({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": f"yo {i}"}]})
            for i in range(40)
        ],
    )
    splits = build_splits(DataConfig(train=share), artifacts["model"])
    assert splits.format == "sharegpt"
    assert sum(count_records(splits.records)["records"].values()) == 40


@pytest.mark.integration
def test_every_file_type_in_one_directory(ray_cluster, artifacts, tmp_path):
    """JSONL, JSON, Parquet, CSV (gzip/zstd too) in one tree: every record read, parsed and counted once."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        for i in range(60)
    ]
    folder = tmp_path / "mixed"
    folder.mkdir()
    write_lines(folder / "a.jsonl", [json.dumps(r) for r in records[:10]])
    write_lines(folder / "b.jsonl.gz", [json.dumps(r) for r in records[10:20]], compress=True)
    (folder / "c.json").write_text(json.dumps(records[20:30]))
    pq.write_table(pa.Table.from_pylist(records[30:40]), str(folder / "d.parquet"))
    csv_text = "messages\n" + "".join(
        '"' + json.dumps(r["messages"]).replace('"', '""') + '"\n' for r in records[40:50]
    )
    (folder / "e.csv").write_text(csv_text)
    with pa.output_stream(str(folder / "f.jsonl.zst"), compression="zstd") as out:
        out.write("".join(json.dumps(r) + "\n" for r in records[50:]).encode())
    splits = build_splits(DataConfig(train=str(folder), format="messages"), artifacts["model"])
    counts = count_records(splits.records)
    assert counts["records_in"] == 60 and counts["rejected"] == {}
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(artifacts["model"])
    texts = sorted(tok.decode(r["input_ids"]) for r in splits.records.take_all())
    assert texts == sorted(f"<|begin|><|user|>\nq{i}<|end|>\n<|assistant|>\na{i}<|end|>\n" for i in range(60))

    import datasets

    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "hf"))
    splits = build_splits(DataConfig(train=str(tmp_path / "hf")), artifacts["model"])
    assert splits.format == "messages"
    assert count_records(splits.records) == counts


def test_duplicates_are_found_within_runs_of_equal_keys_only():
    """Rows sharing a key (a hash collision of different conversations, or true copies) are compared by text; the
    first by (source, line) of each copy stays; rows with unique keys pass untouched; the text column goes."""
    import pyarrow as pa

    from pipelines.dataset import mark_duplicates

    block = pa.table(
        {
            "key": pa.array([1, 2, 2, 2, 3, 4, 4], pa.int64()),
            "conversation": ["a", "b", "c", "b", "d", "e", "e"],
            "reject": [""] * 7,
            "detail": [""] * 7,
            "split": ["train"] * 7,
            "record": [""] * 7,
            "source": ["f"] * 7,
            "line": list(range(1, 8)),
        }
    )
    out = mark_duplicates(block, dedup=True)
    assert "conversation" not in out.column_names
    assert out.column("reject").to_pylist() == ["", "", "", "duplicate", "", "", "duplicate"]
    assert out.column("detail").to_pylist()[3] == "same conversation as f:2"
    assert out.column("record").to_pylist() == ["", "", "", "b", "", "", "e"]
    assert out.column("split").to_pylist() == ["train"] * 3 + [""] + ["train"] * 2 + [""]
    assert mark_duplicates(block, dedup=False).column("reject").to_pylist() == [""] * 7
    assert mark_duplicates(block.slice(0, 0), dedup=True).num_rows == 0
    # records rejected before (all of parsing's rejects share key 0) are neither copies nor originals
    rejected = pa.table(
        {
            "key": pa.array([0, 0, 0, 5, 5], pa.int64()),
            "conversation": ["", "", "", "x", "x"],
            "reject": ["unparsable", "empty_content", "", "too_long", ""],
            "detail": ["e"] * 5,
            "split": ["", "", "val", "", "train"],
            "record": ["r1", "r2", "", "x", ""],
            "source": ["f"] * 5,
            "line": list(range(1, 6)),
        }
    )
    out = mark_duplicates(rejected, dedup=True)
    assert out.column("reject").to_pylist() == ["unparsable", "empty_content", "", "too_long", ""]
    assert out.column("record").to_pylist() == ["r1", "r2", "", "x", ""]
