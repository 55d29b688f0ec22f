"""Finding input files and reading them into Ray Data, streamed, with the source file and line of every record.

Every format becomes the same rows `{source, line, raw}`: `raw` is the record as JSON bytes (a JSON Lines line as
it is), parsed later in parallel so that a bad record becomes a reject, not a crashed read. `line` is the line
number in a JSON Lines file, the 1-based position in a JSON list, the line of a CSV file (the header is line 1),
and the 1-based row number in a Parquet file or Arrow shard of a Hugging Face dataset.
"""

import codecs
import csv
import glob
import io
import json
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import pyarrow as pa
from ray.data.datasource import FileBasedDatasource

from core.console import say
from core.errors import UserError, first_line

COMPRESSION = (".gz", ".zst")
HF_ARROW = ".arrow"  # shards of a saved Hugging Face dataset (found through `datasets.load_from_disk`)
ROWS_PER_BLOCK = 8192  # ~ a few MB of conversations: big enough to amortise, small enough to stream


def resolve_files(spec: str, announce: bool = True, key: str = "data.train") -> list[str]:
    """The data files that `spec` names (a file, a glob, a directory, or a saved Hugging Face dataset
    directory), sorted; a UserError naming the config `key` if there are none or one has an unsupported type.
    `announce`: say which split of a Hugging Face DatasetDict is used."""
    if any(ch in spec for ch in "*?["):
        files = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
    elif os.path.isdir(spec):
        if is_hf_dataset(spec):
            return hf_dataset_files(spec, announce, key)
        files = sorted(
            os.path.join(root, name) for root, _, names in os.walk(spec) for name in names if name.endswith(SUFFIXES)
        )
    elif os.path.isfile(spec):
        files = [spec]
    else:
        raise UserError(
            f"{key}: {spec} does not exist (give a file, a glob, a directory or a saved Hugging Face dataset)"
        )
    if not files:
        raise UserError(
            f"{key}: no data files found at {spec} (valid: {', '.join(BASE_SUFFIXES)}, "
            "optionally .gz/.zst, or a saved Hugging Face dataset directory)"
        )
    for path in files:
        if not path.endswith(SUFFIXES):
            raise UserError(
                f"{key}: {path} is not a supported file type (valid: {', '.join(BASE_SUFFIXES)}, optionally .gz/.zst)"
            )
    return files


def is_hf_dataset(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, name)) for name in ("state.json", "dataset_dict.json"))


def source_files(data, announce: bool = True) -> list[list[str]]:
    """The files of each training source of `data` (a DataConfig); a file that two sources name is refused,
    since a record belongs to one source."""
    found, owner = [], {}
    for index, source in enumerate(data.sources()):
        key = data.source_key(index)
        files = resolve_files(source.path, announce, key)
        for path in files:
            if path in owner:
                raise UserError(
                    f"{key}: {path} is also in {data.source_key(owner[path])}; a file belongs to one source"
                )
            owner[path] = index
        found.append(files)
    return found


def hf_dataset_files(path: str, announce: bool = True, key: str = "data.train") -> list[str]:
    """The Arrow shards of a `save_to_disk` dataset; of a DatasetDict, those of its `train` split."""
    import datasets

    try:
        loaded = datasets.load_from_disk(path)
    except Exception as exc:
        raise UserError(
            f"{key}: {path} looks like a saved Hugging Face dataset but cannot be loaded: {first_line(exc)}"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise UserError(
                f"{key}: the Hugging Face DatasetDict at {path} has no `train` split "
                f"(it has {', '.join(loaded)}); point {key} at one split's folder"
            )
        if announce:
            say(f"{key}: using the `train` split of the Hugging Face DatasetDict at {path}")
        loaded = loaded["train"]
    if loaded._indices is not None:  # a filtered/shuffled view: its Arrow files would not be the rows it shows
        raise UserError(
            f"{key}: the Hugging Face dataset at {path} is an index view; save it with "
            "`dataset.flatten_indices().save_to_disk(...)`"
        )
    return [entry["filename"] for entry in loaded.cache_files]


class RecordSource(FileBasedDatasource):
    """Rows `{source, line, raw}` from any supported file, read in a stream of blocks (never a whole file at
    once, except a `.json` list, which can only be parsed whole; that happens in the read task, not the driver)."""

    _FILE_EXTENSIONS = ["jsonl", "json", "parquet", "csv", "gz", "zst", "arrow"]

    def _open_input_source(self, filesystem, path: str, **open_args) -> "pa.NativeFile":
        if path.endswith(".parquet"):  # Parquet needs random access to read its footer
            return filesystem.open_input_file(path)
        return super()._open_input_source(filesystem, path, **open_args)

    def _read_stream(self, f: "pa.NativeFile", path: str) -> Iterator[pa.Table]:
        return read_records(f, path)


def read_records(f: "pa.NativeFile", path: str) -> Iterator[pa.Table]:
    """Blocks of `{source, line, raw}` from one open (already decompressed) file, by its extension. A file that
    cannot be decoded at all (a corrupt or truncated archive, a broken Parquet footer) holds no records we could
    account for: refused, naming it."""
    try:
        yield from _records(f, path)
    except (OSError, pa.ArrowException, csv.Error, EOFError) as exc:
        raise UserError(
            f"data.train: {path} cannot be read ({type(exc).__name__}: {exc}); repair or remove it"
        ) from None


def _records(f: "pa.NativeFile", path: str) -> Iterator[pa.Table]:
    base = path[: -len(ext)] if (ext := next((c for c in COMPRESSION if path.endswith(c)), "")) else path
    for suffix, file_type in FILE_TYPES.items():
        if base.endswith(suffix):
            return file_type.read(f, path)
    if path.endswith(HF_ARROW):
        return _table_batches(pa.ipc.open_stream(f), path, first=1)
    raise ValueError(f"unsupported file type: {path}")  # resolve_files admits only the types above


def first_records(path: str, limit: int) -> list[bytes]:
    """The raw text of up to `limit` records from the start of one file (to detect the format)."""
    opened = pa.OSFile(path) if path.endswith((".parquet", HF_ARROW)) else pa.input_stream(path, compression="detect")
    with opened as f:
        for block in read_records(f, path):
            return block.column("raw").to_pylist()[:limit]
    return []


def _jsonl(f, path: str) -> Iterator[pa.Table]:
    number = 0
    lines: list[bytes] = []
    numbers: list[int] = []
    rest = b""
    first = True
    while True:
        chunk = f.read(1 << 22)
        if not chunk:
            break
        if first:  # a byte order mark (Windows tools write one) is not part of the first record
            chunk, first = chunk.removeprefix(codecs.BOM_UTF8), False
        parts = (rest + chunk).split(b"\n")
        rest = parts.pop()
        for part in parts:
            number += 1
            if part.strip():  # blank lines are not records
                lines.append(part)
                numbers.append(number)
        if len(lines) >= ROWS_PER_BLOCK:
            yield _block(path, numbers, lines)
            lines, numbers = [], []
    if rest.strip():
        lines.append(rest)
        numbers.append(number + 1)
    if lines:
        yield _block(path, numbers, lines)


def _json_list(f, path: str) -> Iterator[pa.Table]:
    data = f.read()
    try:
        encoding = json.detect_encoding(data)  # what json.loads would decode it as: UTF-8, or UTF-16/32 by its BOM
        # invalid UTF-8 inside a string spoils only its own record: its bytes are carried through (see _dump) and
        # that record is rejected as invalid_utf8, not the whole file as unparsable
        text = data.decode("utf-8-sig", "surrogateescape") if encoding.startswith("utf-8") else data.decode(encoding)
        records = json.loads(text)
    except (ValueError, RecursionError):
        # not one JSON document: the whole file is one unparsable record, kept so it shows up in the rejects
        yield _block(path, [0], [data])
        return
    if not isinstance(records, list):
        records = [records]
    for start in range(0, len(records), ROWS_PER_BLOCK):
        chunk = records[start : start + ROWS_PER_BLOCK]
        yield _block(path, list(range(start + 1, start + 1 + len(chunk))), [_dump(r) for r in chunk])


def _csv(f, path: str) -> Iterator[pa.Table]:
    """Rows of a CSV file with a header; every cell stays text (a JSON list in a `messages` cell is decoded later).
    Invalid UTF-8 is carried through as the original bytes, so the record is rejected as such, not altered."""
    csv.field_size_limit(1 << 30)
    reader = csv.DictReader(io.TextIOWrapper(f, encoding="utf-8-sig", errors="surrogateescape", newline=""))
    lines: list[bytes] = []
    numbers: list[int] = []
    start = 2  # line 1 is the header
    for row in reader:
        numbers.append(start)
        lines.append(
            json.dumps(
                {k: ("" if v is None else v) for k, v in row.items() if k is not None}, ensure_ascii=False
            ).encode("utf-8", "surrogateescape")
        )
        start = reader.line_num + 1  # a quoted cell may span lines: the next record starts after this one
        if len(lines) >= ROWS_PER_BLOCK:
            yield _block(path, numbers, lines)
            lines, numbers = [], []
    if lines:
        yield _block(path, numbers, lines)


def _parquet_batches(f):
    import pyarrow.parquet as pq

    return pq.ParquetFile(f).iter_batches(batch_size=ROWS_PER_BLOCK)


def _table_batches(batches, path: str, first: int) -> Iterator[pa.Table]:
    number = first
    for batch in batches:
        rows = batch.to_pylist()
        yield _block(path, list(range(number, number + len(rows))), [_dump(r) for r in rows])
        number += len(rows)


def _dump(record) -> bytes:
    """A record as JSON bytes; bytes that were not UTF-8 in the file (decoded as surrogate escapes) are put back as
    they were, and any other lone surrogate (escaped in the JSON itself) stays escaped: parsing rejects both."""
    try:
        return json.dumps(record, ensure_ascii=False, default=str).encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return json.dumps(record, default=str).encode("ascii")


def _block(path: str, numbers: list[int], lines: list[bytes]) -> pa.Table:
    return pa.table(
        {
            "source": pa.array([path] * len(lines), pa.string()),
            "line": pa.array(numbers, pa.int64()),
            "raw": pa.array(lines, pa.binary()),
        }
    )


def _parquet(f, path: str) -> Iterator[pa.Table]:
    return _table_batches(_parquet_batches(f), path, first=1)


@dataclass(frozen=True)
class FileType:
    read: Callable  # (open file, its path) -> blocks of {source, line, raw}
    compressible: bool  # also read as .gz / .zst


# Every file type data.train takes, by suffix. Adding one is a reader function and a line here.
FILE_TYPES = {
    ".jsonl": FileType(_jsonl, compressible=True),
    ".json": FileType(_json_list, compressible=True),
    ".parquet": FileType(_parquet, compressible=False),
    ".csv": FileType(_csv, compressible=True),
}
BASE_SUFFIXES = tuple(FILE_TYPES)
SUFFIXES = BASE_SUFFIXES + tuple(s + c for s, t in FILE_TYPES.items() if t.compressible for c in COMPRESSION)
