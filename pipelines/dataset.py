"""The Ray Data pipeline: records → parsed, cleaned conversations with a stable split → tokens and labels →
deduplicated and ordered (one sort) → packed training rows per split.

Nothing passes through the driver: blocks flow from the read tasks through the parse tasks and the tokenizer
actor pool into Ray's object store, and from there to whoever consumes them (Ray Train workers, or a writer).
"""

import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data
from ray.data.exceptions import ExecutionTimeoutError
from ray.data.expressions import col

from core.console import say
from core.errors import UserError, first_line
from pipelines.chat import ChatTokenizer, TemplateError, check_tokenizer
from pipelines.config import DataConfig
from pipelines.formats import FORMATS, Reject, detect_format, normalize
from pipelines.packing import pack_batch, unpacked_batch
from pipelines.sources import RecordSource, first_records, source_files

SPLITS = ("train", "val", "test")
PARTITION_BYTES = 64 << 20  # input bytes per shuffle partition (duplicate check, split order)


@dataclass
class Splits:
    """Tokenized (and packed) datasets per split, every input record with its outcome, and what the driver learnt.

    `records` holds one row per input record: `source, line, split, reject, detail, record, truncated, num_tokens`
    (and its tokens; in a mixture also `copies`, how many times an epoch draws it, and `drawn_tokens`); the splits
    hold training rows `input_ids, labels, position_ids, num_tokens`.
    """

    train: ray.data.Dataset | None
    val: ray.data.Dataset | None
    test: ray.data.Dataset | None
    records: ray.data.Dataset
    format: str
    files: list[str]
    sources: list[dict]  # per training source: path, format, weight, files (a mixture has several)


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"model.name_or_path: cannot load a tokenizer from {name_or_path}: {first_line(exc)}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_splits(
    data: DataConfig,
    model_path: str,
    trust_remote_code: bool = False,
    splits: tuple[str, ...] = SPLITS,
    wait_s: float | None = None,
) -> Splits:
    """Read, parse, clean and tokenize every record once; then one sort by a seeded hash of the conversation
    deduplicates (copies sort next to each other) and orders every split; then pack the requested splits.
    Intermediate results live in Ray's object store (spilling to disk when large).

    The sort has fixed partition boundaries and each sorted partition (one block) is packed on its own, so a
    split's rows and their order depend only on the data and the seed — not on file order, block layout, cluster
    size or task timing. That is what exact resume and reproducible runs rest on."""
    sources = sources_of(data)
    files = [path for source in sources for path in source["files"]]
    formats = {path: source["format"] for source in sources for path in source["files"]}
    used = sorted(set(formats.values()))
    fmt = used[0] if len(used) == 1 else "mixed"
    tokenizer = load_tokenizer(model_path, trust_remote_code)
    if used != ["text"]:
        try:
            check_tokenizer(tokenizer, model_path, data.loss_on)
        except TemplateError as exc:
            raise UserError(f"model.name_or_path: {exc}") from None
    # the actors get the tokenizer loaded here: unpickling it skips AutoTokenizer and the torch import that comes
    # with it (seconds per actor); one whose classes are the model's own code loads in each actor
    tokenizer_args = dict(
        tokenizer=(model_path, True) if trust_remote_code else tokenizer,
        max_length=data.max_length,
        loss_on=data.loss_on,
        overlong=data.overlong,
    )
    source = ray.data.read_datasource(RecordSource(files))
    if wait_s:
        # the stage that needs CPUs beside the training workers' (a pool of actors + read tasks): Ray Data's stall
        # guard lets it wait for them as long as the workers may wait for theirs, then explain instead of hanging
        source.context.execution_no_progress_timeout_s = wait_s
    actors = tokenizer_pool(data.tokenizer_actors)
    try:
        tokenized = (
            source.map_batches(
                parse_batch,
                fn_kwargs=dict(formats=formats, val=data.split.val, test=data.split.test, seed=data.split.seed),
                batch_size=data.batch_size,
                batch_format="pyarrow",
            )
            .map_batches(
                Tokenizer,
                fn_constructor_kwargs=tokenizer_args,
                batch_size=data.batch_size,
                batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(size=actors),
                num_cpus=1,
            )
            .materialize()
        )
    except ExecutionTimeoutError:
        raise UserError(stalled(actors, wait_s or source.context.execution_no_progress_timeout_s)) from None
    # later stages and the training stream (idle while the workers evaluate) keep Ray Data's own patience
    context = tokenized.context
    context.execution_no_progress_timeout_s = ray.data.DataContext.get_current().execution_no_progress_timeout_s
    # Ray Data cuts a sort's output into blocks of target_max_block_size before the next map sees them, which would
    # part copies of a conversation that meet at a cut: here (and downstream) a sorted partition stays one block
    context.target_max_block_size = None
    # the sort's map tasks take a partition's worth of input each, not Ray's 1 GiB (one task, on one core, for
    # all but the largest inputs)
    context.shuffle_input_batch_bytes = PARTITION_BYTES
    # every record goes through the sort (rejects too: no filtering pass before it), so the sorted records are
    # also the account of every record
    records = materialize_in_order(
        tokenized.sort(["key", "source", "line"], boundaries=_boundaries(_partitions(files)))
        # batch_size=None: one call per sorted block, which holds every copy of its conversations
        .map_batches(mark_duplicates, fn_kwargs=dict(dedup=data.dedup), batch_size=None, batch_format="pyarrow")
    )
    mixed = len(sources) > 1
    if mixed:  # each training record drawn as many times as its source's weight asks, in an order of its own
        rates = mixture_rates(records, data, sources)
        records = materialize_in_order(  # one call per sorted block: val/test are packed per block, as before
            records.map_batches(
                draw, fn_kwargs=dict(rates=rates, seed=data.split.seed), batch_size=None, batch_format="pyarrow"
            )
        )
    out = {split: None for split in SPLITS}
    for split in splits:
        rows = records.filter(expr=(col("reject") == "") & (col("split") == split)).select_columns(
            ["input_ids", "labels", "num_tokens", "key"] + (["copies"] if mixed else [])
        )
        if mixed and split == "train":
            rows = rows.map_batches(
                repeat, fn_kwargs=dict(seed=data.split.seed), batch_size=None, batch_format="pyarrow"
            ).sort("key", boundaries=_boundaries(_partitions(files)))
        # per sorted block again, so the packing does not depend on how blocks arrive
        if data.packing:
            rows = rows.map_batches(
                pack_batch,
                fn_kwargs=dict(max_length=data.max_length, seed=data.split.seed),
                batch_size=None,
                batch_format="pyarrow",
            )
        else:
            rows = rows.map_batches(unpacked_batch, batch_size=None, batch_format="pyarrow")
        out[split] = materialize_in_order(rows)
    return Splits(
        train=out["train"],
        val=out["val"],
        test=out["test"],
        records=records,
        format=fmt,
        files=files,
        sources=sources,
    )


def sources_of(data: DataConfig) -> list[dict]:
    """Each training source with its files and format (detected for `auto`, and announced)."""
    sources = []
    for source, files in zip(data.sources(), source_files(data)):
        fmt = source.format or data.format
        fmt = fmt if fmt != "auto" else detect_file_format(files)
        sources.append({"path": source.path, "format": fmt, "weight": source.weight, "files": files})
    return sources


def mixture_rates(records: ray.data.Dataset, data: DataConfig, sources: list[dict]) -> dict[str, float]:
    """Per file, how many times an epoch draws each of its source's training records: the source's share of the
    weights times all the sources' training records, over its own."""
    accepted = records.filter(expr=(col("reject") == "") & (col("split") == "train"))
    per_file = {row["source"]: row["count()"] for row in accepted.groupby("source").count().take_all()}
    have = [sum(per_file.get(path, 0) for path in source["files"]) for source in sources]
    weights = sum(source["weight"] for source in sources)
    rates = {}
    for index, (source, n) in enumerate(zip(sources, have)):
        if n == 0:
            raise UserError(
                f"{data.source_key(index)}: {source['path']} has no training record to draw from (all rejected or "
                "held out for val/test); `zeray prep` writes each rejected record with its reason"
            )
        rate = sum(have) * source["weight"] / weights / n
        rates.update({path: rate for path in source["files"]})
    return rates


def _mix(values: np.ndarray, salt: int) -> np.ndarray:
    """splitmix64 of int64 values with a salt: uniformly spread uint64, unrelated to the values' order."""
    z = values.astype(np.int64).view(np.uint64) ^ np.uint64(salt & (2**64 - 1))
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def draw(block: pa.Table, rates: dict[str, float], seed: int) -> pa.Table:
    """`copies`: the epoch's draws of each accepted training record (the whole part of its source's rate, and one
    more with the rate's fractional part as probability, from a seeded hash of the record); 1 for a val/test
    record, 0 for a reject. `drawn_tokens`: its tokens times that."""
    rate = np.array([rates.get(s, 0.0) for s in block.column("source").to_pylist()], dtype=np.float64)
    u = (_mix(block.column("key").to_numpy(), seed * 7919 + 1) >> np.uint64(11)).astype(np.float64) / 2.0**53
    drawn = np.floor(rate) + (u < rate - np.floor(rate))
    accepted = pc.equal(block.column("reject"), "").to_numpy(zero_copy_only=False)
    train = pc.equal(block.column("split"), "train").to_numpy(zero_copy_only=False)
    copies = np.where(accepted & train, drawn, np.where(accepted, 1, 0)).astype(np.int32)
    tokens = block.column("num_tokens").to_numpy().astype(np.int64) * copies
    return block.append_column("copies", pa.array(copies, pa.int32())).append_column(
        "drawn_tokens", pa.array(tokens, pa.int64())
    )


def repeat(block: pa.Table, seed: int) -> pa.Table:
    """Each row `copies` times, every copy with its own order key (so repeats spread over the epoch)."""
    copies = block.column("copies").to_numpy()
    index = np.repeat(np.arange(block.num_rows), copies)
    nth = np.arange(len(index)) - np.repeat(np.cumsum(copies) - copies, copies)  # copy number within its row
    keys = block.column("key").to_numpy()[index]
    new_keys = _mix(keys ^ nth.astype(np.int64), seed * 104729 + 2).view(np.int64)
    out = block.take(pa.array(index, pa.int64())).drop_columns(["copies"])
    return out.set_column(out.schema.get_field_index("key"), "key", pa.array(new_keys, pa.int64()))


def tokenizer_pool(setting: int | str) -> int:
    """Size of the tokenizer pool: at most the cluster's free CPUs less one, which the read and parse tasks keep
    (actors holding every CPU would wait forever for blocks those tasks could then never produce; CPUs other work
    holds are not ours to count on); `auto` on a single machine also stops at its cores, since Ray's logical
    CPUs there may outnumber them."""
    cpus = int(min(ray.cluster_resources().get("CPU", 1), ray.available_resources().get("CPU", 0)))
    most = max(1, cpus - 1)
    if setting == "auto":
        alive = [n for n in ray.nodes() if n.get("Alive")]
        return min(most, os.cpu_count() or 1) if len(alive) <= 1 else most
    if setting > most:
        say(
            f"data.tokenizer_actors={setting} capped to {most}: the cluster has {cpus} CPUs free and reading "
            "and parsing need one",
        )
        return most
    return setting


def stalled(actors: int, wait_s: float) -> str:
    """Why preprocessing stopped: what it needs against what the cluster has and has free right now."""
    total, free = ray.cluster_resources().get("CPU", 0), ray.available_resources().get("CPU", 0)
    return (
        f"data: preprocessing could not go on for {wait_s:g}s (cluster.placement_timeout_s): it needs 1 CPU "
        f"to read and {actors} for its tokenizer actors (data.tokenizer_actors), and the cluster has {total:g} "
        f"CPU in total, {free:g} free now; wait for the work holding them to finish, lower "
        "data.tokenizer_actors, or add CPUs"
    )


def _partitions(files: list[str]) -> int:
    """Shuffle partitions sized to the input: Ray Data's default of 200 makes a small dataset 200 tiny blocks,
    and every later stage pays per block."""
    return int(min(200, max(2, sum(_size(f) for f in files) // PARTITION_BYTES + 1)))


def _boundaries(partitions: int) -> list[int]:
    """Fixed, evenly spaced sort boundaries over the int64 hash space (Ray would otherwise sample them)."""
    return [-(2**63) + (2**64 * i) // partitions for i in range(1, partitions)]


@contextmanager
def overriding(settings, **values):
    """`settings` (Ray Data's DataContext or part of it) with `values` for the block, then as before."""
    before = {name: getattr(settings, name) for name in values}
    for name, value in values.items():
        setattr(settings, name, value)
    try:
        yield
    finally:
        for name, value in before.items():
            setattr(settings, name, value)


def materialize_in_order(ds: ray.data.Dataset) -> ray.data.Dataset:
    """Materialize keeping block order (by default Ray Data keeps blocks in the order tasks finish). Set on the
    dataset's own context: a dataset runs with the copy of the current one it took when it was created."""
    with overriding(ds.context.execution_options, preserve_order=True):
        return ds.materialize()


def mark_duplicates(block: pa.Table, dedup: bool) -> pa.Table:
    """In a block sorted by (key, source, line): of identical accepted conversations, the first by (source, line)
    stays and the rest are rejected as `duplicate`, naming the one kept; rows already rejected are left as they
    are. Drops the conversation text, keeping it as the `record` of a duplicate. Only accepted rows that share a
    key with a neighbour are looked at one by one."""
    keys = block.column("key").to_numpy()
    accepted = pc.equal(block.column("reject"), "").to_numpy(zero_copy_only=False)
    both = accepted[1:] & accepted[:-1]  # rejects do not count as copies (those from parsing all have key 0)
    tied = np.flatnonzero((keys[1:] == keys[:-1]) & both) if dedup and block.num_rows > 1 else []
    if len(tied):
        conversations = block.column("conversation").to_pylist()
        reject, detail, split, record = (block.column(c).to_pylist() for c in ("reject", "detail", "split", "record"))
        sources, lines = block.column("source").to_pylist(), block.column("line").to_pylist()
        kept: dict[str, int] = {}  # conversation -> row kept, within a run of equal keys
        run = None
        for i in sorted(set(tied.tolist()) | set((tied + 1).tolist())):
            if keys[i] != run:
                kept, run = {}, keys[i]
            first = kept.setdefault(conversations[i], i)
            if first != i:
                reject[i], detail[i], split[i] = (
                    "duplicate",
                    f"same conversation as {sources[first]}:{lines[first]}",
                    "",
                )
                record[i] = conversations[i]
        for name, values in (("reject", reject), ("detail", detail), ("split", split), ("record", record)):
            block = block.set_column(block.schema.get_field_index(name), name, pa.array(values, pa.string()))
    return block.drop_columns(["conversation"])


def parse_batch(batch: pa.Table, formats: dict[str, str], val: float, test: float, seed: int) -> pa.Table:
    """Parse and clean raw lines, each in its file's format; a bad record gets a reject reason instead of
    disappearing."""
    rejects, details, splits, conversations, originals, keys = [], [], [], [], [], []
    for raw, source in zip(batch.column("raw").to_pylist(), batch.column("source").to_pylist()):
        fmt = formats[source]
        reason, detail, split, conversation, original, key = "", "", "", "", "", 0
        try:
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise Reject("invalid_utf8", str(exc)) from None
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                raise Reject("unparsable", exc.msg) from None
            except RecursionError:
                raise Reject("unparsable", "nested too deeply") from None
            turns = normalize(record, fmt)
            conversation = json.dumps(turns, ensure_ascii=False, sort_keys=True)
            try:
                conversation.encode("utf-8")
            except UnicodeEncodeError as exc:  # a lone surrogate escaped in the JSON ("\ud800"): not text
                raise Reject(
                    "invalid_utf8",
                    f"lone surrogate {exc.object[exc.start]!r} (escaped in the JSON) is not valid Unicode",
                ) from None
            split = split_of(conversation, val, test, seed)
            key = order_key(conversation, seed)
        except Reject as rej:
            reason, detail, conversation = rej.reason, rej.detail, ""
            original = raw.decode("utf-8", errors="replace")  # kept for rejects.jsonl, so it can be fixed
        rejects.append(reason)
        details.append(detail)
        splits.append(split)
        conversations.append(conversation)
        originals.append(original)
        keys.append(key)
    return pa.table(
        {
            "source": batch.column("source"),
            "line": batch.column("line"),
            "split": pa.array(splits, pa.string()),
            "reject": pa.array(rejects, pa.string()),
            "detail": pa.array(details, pa.string()),
            "conversation": pa.array(conversations, pa.string()),
            "record": pa.array(originals, pa.string()),
            "key": pa.array(keys, pa.int64()),
        }
    )


def count_records(records: ray.data.Dataset, sources: list[dict] | None = None) -> dict:
    """Records per split, rejects per reason, and how many were truncated, counted over `Splits.records`; for a
    mixture (several `sources`) the same per source, with the epoch's draws and tokens."""
    rows = records.groupby(["split", "reject", "truncated"]).count().take_all()
    splits = {s: 0 for s in SPLITS}
    rejected: dict[str, int] = {}
    truncated = 0
    for row in rows:
        n = row["count()"]
        if row["reject"]:
            rejected[row["reject"]] = rejected.get(row["reject"], 0) + n
        else:
            splits[row["split"]] += n
            truncated += n if row["truncated"] else 0
    counts = {
        "records_in": sum(splits.values()) + sum(rejected.values()),
        "records": splits,
        "rejected": dict(sorted(rejected.items())),
        "truncated": truncated,
    }
    if sources and len(sources) > 1:
        counts["sources"] = source_counts(records, sources)
    return counts


def source_counts(records: ray.data.Dataset, sources: list[dict]) -> list[dict]:
    """Per source of a mixture: records in, out per split, rejects per reason; `drawn`, its training records an
    epoch draws (repeats counted), and `tokens`, theirs, with their share of all training tokens."""
    from ray.data.aggregate import Count, Sum

    owner = {path: index for index, source in enumerate(sources) for path in source["files"]}
    out = [
        {
            "path": source["path"],
            "format": source["format"],
            "weight": source["weight"],
            "records_in": 0,
            "records": {split: 0 for split in SPLITS},
            "rejected": {},
            "drawn": 0,
            "tokens": 0,
        }
        for source in sources
    ]
    groups = records.groupby(["source", "split", "reject"]).aggregate(Count(), Sum("copies"), Sum("drawn_tokens"))
    for row in groups.take_all():
        entry, n = out[owner[row["source"]]], row["count()"]
        entry["records_in"] += n
        if row["reject"]:
            entry["rejected"][row["reject"]] = entry["rejected"].get(row["reject"], 0) + n
            continue
        entry["records"][row["split"]] += n
        if row["split"] == "train":
            entry["drawn"] += int(row["sum(copies)"])
            entry["tokens"] += int(row["sum(drawn_tokens)"])
    total = sum(entry["tokens"] for entry in out) or 1
    for entry in out:
        entry["rejected"] = dict(sorted(entry["rejected"].items()))
        entry["token_share"] = round(entry["tokens"] / total, 4)
    return out


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


def order_key(conversation: str, seed: int) -> int:
    """A seeded pseudo-random int64 per conversation: sorting by it is the training order's shuffle."""
    digest = hashlib.blake2b(f"order\0{seed}\0{conversation}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class Tokenizer:
    """Ray Data actor: holds the model's tokenizer (the driver's, or loaded once here), then renders and tokenizes
    the accepted records of each batch.
    A record that cannot fit `max_length` becomes a `too_long` reject here, one the chat template refuses a
    `template_error`; rejected rows pass through."""

    def __init__(self, tokenizer, max_length: int, loss_on: str, overlong: str):
        """`tokenizer`: the model's tokenizer, or the (name_or_path, trust_remote_code) to load it from."""
        if isinstance(tokenizer, tuple):
            tokenizer = load_tokenizer(*tokenizer)
        self.chat = ChatTokenizer(tokenizer)
        self.max_length = max_length
        self.loss_on = loss_on
        self.overlong = overlong

    def __call__(self, batch: pa.Table) -> pa.Table:
        reject = batch.column("reject").to_pylist()
        detail = batch.column("detail").to_pylist()
        split = batch.column("split").to_pylist()
        record = batch.column("record").to_pylist()
        conversation = batch.column("conversation").to_pylist()
        todo = [i for i, r in enumerate(reject) if not r]
        done = self.chat.tokenize_batch(
            [json.loads(conversation[i]) for i in todo], self.max_length, self.loss_on, self.overlong
        )
        n = batch.num_rows
        input_ids, labels, truncated = [[] for _ in range(n)], [[] for _ in range(n)], [False] * n
        for i, tok in zip(todo, done):
            if tok.problem in ("too_long", "template_error"):
                reject[i], detail[i], split[i], record[i] = tok.problem, tok.detail, "", conversation[i]
                continue
            input_ids[i], labels[i] = tok.input_ids, tok.labels
            truncated[i] = tok.problem == "truncated"
        return pa.table(
            {
                "source": batch.column("source"),
                "line": batch.column("line"),
                "split": pa.array(split, pa.string()),
                "reject": pa.array(reject, pa.string()),
                "detail": pa.array(detail, pa.string()),
                "record": pa.array(record, pa.string()),
                "key": batch.column("key"),
                "conversation": batch.column("conversation"),
                "truncated": pa.array(truncated, pa.bool_()),
                "input_ids": pa.array(input_ids, pa.list_(pa.int32())),
                "labels": pa.array(labels, pa.list_(pa.int32())),
                "num_tokens": pa.array([len(ids) for ids in input_ids], pa.int32()),
            }
        )


def detect_file_format(files: list[str], probe_lines: int = 100) -> str:
    """The format of the first parsable records (data.format: auto), announced so the user can check it."""
    seen: dict[str, int] = {}
    for path in files:
        for raw in first_records(path, probe_lines):
            try:
                fmt = detect_format(json.loads(raw))
            except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
                continue
            if fmt:
                seen[fmt] = seen.get(fmt, 0) + 1
        if seen:
            break
    if not seen:
        raise UserError(
            f"data.format: auto found no record it recognises in {files[0]}; "
            f"set data.format to one of {', '.join(FORMATS)}"
        )
    fmt = max(seen, key=seen.get)
    say(f"data.format auto: detected {fmt} from {files[0]}")
    return fmt


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def without_progress_bars(datasets: dict[str, ray.data.Dataset]) -> dict[str, ray.data.Dataset]:
    """`datasets` for Ray Train's workers: their passes over them (each evaluation, each epoch) show on no console,
    and would draw Ray Data's progress bars and ship them, as JSON lines, through Ray's log forwarding into the
    command's log. (Set on each dataset's own context: see materialize_in_order.)"""
    for ds in datasets.values():
        ds.context.enable_progress_bars = False
    return datasets
