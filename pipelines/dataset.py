"""The Ray Data pipeline: JSON Lines → parsed, cleaned conversations → stable split → tokens and labels.

Nothing passes through the driver: blocks stream from the read tasks through the parse tasks and the tokenizer
actor pool to whoever consumes the dataset (Ray Train workers, or a writer).
"""

import hashlib
import json
import os
from dataclasses import dataclass

import pyarrow as pa
import ray
import ray.data
from ray.data.expressions import col

from pipelines.chat import check_tokenizer, tokenize_batch, TemplateError
from pipelines.config import DataConfig
from pipelines.formats import FORMATS, Reject, detect_format, normalize
from pipelines.sources import RecordSource, first_records, resolve_files
from zeray.errors import UserError

SPLITS = ("train", "val", "test")
PARTITION_BYTES = 64 << 20  # input bytes per duplicate-check partition


@dataclass
class Splits:
    """Tokenized datasets per split, the parsed records they come from, and what the driver learnt."""

    train: ray.data.Dataset
    val: ray.data.Dataset
    test: ray.data.Dataset
    parsed: ray.data.Dataset
    format: str
    files: list[str]


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"model.name_or_path: cannot load a tokenizer from {name_or_path}: {_first_line(exc)}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_splits(data: DataConfig, model_path: str, trust_remote_code: bool = False) -> Splits:
    """Ray Datasets of `{input_ids, labels, num_tokens}` per split. The parsed records are materialized here
    (one read of the input); the splits are lazy, and executing one streams shuffle and tokenization."""
    files = resolve_files(data.train)
    fmt = data.format if data.format != "auto" else detect_file_format(files)
    if fmt != "text" or data.loss_on != "all":
        tokenizer = load_tokenizer(model_path, trust_remote_code)
        if fmt != "text":
            try:
                check_tokenizer(tokenizer, model_path)
            except TemplateError as exc:
                raise UserError(f"model.name_or_path: {exc}") from None
    parsed = parsed_records(files, fmt, data)
    tokenizer_args = dict(name_or_path=model_path, trust_remote_code=trust_remote_code,
                          max_length=data.max_length, loss_on=data.loss_on)
    out = {}
    for split in SPLITS:
        records = parsed.filter(expr=(col("reject") == "") & (col("split") == split))
        if split == "train":
            # Files are often sorted by topic or source; a seeded global shuffle makes every batch a fair
            # sample and keeps the order reproducible (Ray Train then preserves it).
            records = records.random_shuffle(seed=data.split.seed)
        out[split] = (
            records.map_batches(Tokenizer, fn_constructor_kwargs=tokenizer_args, batch_size=data.batch_size,
                         batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=data.tokenizer_actors),
                         num_cpus=1)
        )
    return Splits(train=out["train"], val=out["val"], test=out["test"], parsed=parsed, format=fmt, files=files)


def parsed_records(files: list[str], fmt: str, data: DataConfig) -> ray.data.Dataset:
    """Every input record with `source, line, split, reject, detail, conversation` (JSON of the cleaned turns)
    and, for a rejected one, `record` (its original text).

    With `data.dedup` the rows are materialized once (into Ray's object store, spilling to disk when large): the
    duplicate check needs the whole dataset, and the count, every split and the rejects all read the result.
    Known limit: the block layout of that result varies between runs, and Ray Train's shard assignment follows
    it, so bit-exact reproducibility and exact resume are guaranteed only with `data.dedup: false`.
    """
    parsed = ray.data.read_datasource(RecordSource(files)).map_batches(
        parse_batch, fn_kwargs=dict(fmt=fmt, val=data.split.val, test=data.split.test, seed=data.split.seed),
        batch_size=data.batch_size, batch_format="pyarrow",
    )
    if not data.dedup:
        return parsed  # lazy: streamed from the files by every consumer, in a reproducible order
    accepted = parsed.filter(expr=col("reject") == "")
    rejected = parsed.filter(expr=col("reject") != "")
    # Ray Data's default of 200 shuffle partitions makes a small dataset 200 tiny blocks, and every later
    # stage (the train shuffle, tokenization) pays per block: size the partitions to the input instead.
    partitions = int(min(200, max(2, sum(_size(f) for f in files) // PARTITION_BYTES + 1)))
    parsed = (accepted.groupby("conversation", num_partitions=partitions)
              .map_groups(mark_duplicates, batch_format="pyarrow").union(rejected))
    return parsed.materialize()


def mark_duplicates(group: pa.Table) -> pa.Table:
    """Of identical conversations (across all files), the first by (source, line) stays; the rest are rejected
    as `duplicate`, naming the one kept."""
    if group.num_rows == 1:
        return group
    group = group.sort_by([("source", "ascending"), ("line", "ascending")])
    first = f"{group['source'][0].as_py()}:{group['line'][0].as_py()}"
    n = group.num_rows
    reject = pa.array([""] + ["duplicate"] * (n - 1), pa.string())
    detail = pa.array([""] + [f"same conversation as {first}"] * (n - 1), pa.string())
    record = pa.array([""] + group["conversation"].to_pylist()[1:], pa.string())
    split = pa.array([group["split"][0].as_py()] + [""] * (n - 1), pa.string())
    return group.set_column(group.schema.get_field_index("reject"), "reject", reject) \
        .set_column(group.schema.get_field_index("detail"), "detail", detail) \
        .set_column(group.schema.get_field_index("record"), "record", record) \
        .set_column(group.schema.get_field_index("split"), "split", split)


def parse_batch(batch: pa.Table, fmt: str, val: float, test: float, seed: int) -> pa.Table:
    """Parse and clean raw lines; a bad record gets a reject reason instead of disappearing."""
    rejects, details, splits, conversations, originals = [], [], [], [], []
    for raw in batch.column("raw").to_pylist():
        reason, detail, split, conversation, original = "", "", "", "", ""
        try:
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise Reject("invalid_utf8", str(exc)) from None
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                raise Reject("unparsable", exc.msg) from None
            turns = normalize(record, fmt)
            conversation = json.dumps(turns, ensure_ascii=False, sort_keys=True)
            split = split_of(conversation, val, test, seed)
        except Reject as rej:
            reason, detail = rej.reason, rej.detail
            original = raw.decode("utf-8", errors="replace")  # kept for rejects.jsonl, so it can be fixed
        rejects.append(reason)
        details.append(detail)
        splits.append(split)
        conversations.append(conversation)
        originals.append(original)
    return pa.table({
        "source": batch.column("source"),
        "line": batch.column("line"),
        "split": pa.array(splits, pa.string()),
        "reject": pa.array(rejects, pa.string()),
        "detail": pa.array(details, pa.string()),
        "conversation": pa.array(conversations, pa.string()),
        "record": pa.array(originals, pa.string()),
    })


def count_records(parsed: ray.data.Dataset) -> dict:
    """Records per split and rejects per reason, counted over the parsed records."""
    rows = parsed.groupby(["split", "reject"]).count().take_all()
    splits = {s: 0 for s in SPLITS}
    rejected: dict[str, int] = {}
    for row in rows:
        n = row["count()"]
        if row["reject"]:
            rejected[row["reject"]] = rejected.get(row["reject"], 0) + n
        else:
            splits[row["split"]] += n
    return {"records_in": sum(splits.values()) + sum(rejected.values()), "splits": splits, "rejected": rejected}


def split_of(conversation: str, val: float, test: float, seed: int) -> str:
    """train/val/test from a hash of the cleaned conversation: the same record always lands in the same split,
    whatever the file order, block layout or cluster size."""
    digest = hashlib.blake2b(f"{seed}\0{conversation}".encode("utf-8"), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2**64
    if u < test:
        return "test"
    if u < test + val:
        return "val"
    return "train"


class Tokenizer:
    """Ray Data actor: loads the tokenizer once, then renders and tokenizes batches of conversations."""

    def __init__(self, name_or_path: str, trust_remote_code: bool, max_length: int, loss_on: str):
        self.tokenizer = load_tokenizer(name_or_path, trust_remote_code)
        self.max_length = max_length
        self.loss_on = loss_on

    def __call__(self, batch: pa.Table) -> pa.Table:
        conversations = [json.loads(c) for c in batch.column("conversation").to_pylist()]
        input_ids, labels = tokenize_batch(self.tokenizer, conversations, self.max_length, self.loss_on)
        return pa.table({
            "input_ids": pa.array(input_ids, pa.list_(pa.int32())),
            "labels": pa.array(labels, pa.list_(pa.int32())),
            "num_tokens": pa.array([len(ids) for ids in input_ids], pa.int32()),
        })


def detect_file_format(files: list[str], probe_lines: int = 100) -> str:
    """The format of the first parsable records (data.format: auto), announced so the user can check it."""
    seen: dict[str, int] = {}
    for path in files:
        for raw in first_records(path, probe_lines):
            try:
                fmt = detect_format(json.loads(raw))
            except (ValueError, UnicodeDecodeError):
                continue
            if fmt:
                seen[fmt] = seen.get(fmt, 0) + 1
        if seen:
            break
    if not seen:
        raise UserError(f"data.format: auto found no record it recognises in {files[0]}; "
                        f"set data.format to one of {', '.join(FORMATS)}")
    fmt = max(seen, key=seen.get)
    print(f"data.format auto: detected {fmt} from {files[0]}")
    return fmt


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
