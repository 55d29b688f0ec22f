"""Finding input files and reading JSON Lines into Ray Data, streamed, with the source file and line of every record.

Each record keeps where it came from (`source`, `line`) so a rejected record can be traced back to its file.
Lines are read as bytes and parsed later in parallel, so a bad line becomes a reject, not a crashed read.
"""

import glob
import os
from typing import Iterator

import pyarrow as pa
from ray.data.datasource import FileBasedDatasource

from zeray.errors import UserError

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
LINES_PER_BLOCK = 8192  # ~ a few MB of conversations: big enough to amortise, small enough to stream


def resolve_files(spec: str) -> list[str]:
    """The JSON Lines files that `spec` (a file, a glob or a directory) names, sorted; a UserError if none."""
    if any(ch in spec for ch in "*?["):
        files = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
    elif os.path.isdir(spec):
        files = sorted(
            os.path.join(root, name)
            for root, _, names in os.walk(spec)
            for name in names
            if name.endswith(JSONL_SUFFIXES)
        )
    elif os.path.isfile(spec):
        files = [spec]
    else:
        raise UserError(f"data.train: {spec} does not exist (give a .jsonl file, a glob or a directory)")
    if not files:
        raise UserError(f"data.train: no {'/'.join(JSONL_SUFFIXES)} files found at {spec}")
    unsupported = [f for f in files if not f.endswith(JSONL_SUFFIXES)]
    if unsupported:
        raise UserError(f"data.train: {unsupported[0]} is not a supported file type (valid: {', '.join(JSONL_SUFFIXES)})")
    return files


class JsonLinesSource(FileBasedDatasource):
    """Rows `{source, line, raw}` from JSON Lines files, read in a stream of blocks (never a whole file at once)."""

    _FILE_EXTENSIONS = ["jsonl", "gz", "zst"]

    def _read_stream(self, f: "pa.NativeFile", path: str) -> Iterator[pa.Table]:
        number = 0
        lines: list[bytes] = []
        numbers: list[int] = []
        rest = b""
        while True:
            chunk = f.read(1 << 22)
            if not chunk:
                break
            parts = (rest + chunk).split(b"\n")
            rest = parts.pop()
            for part in parts:
                number += 1
                if part.strip():
                    lines.append(part)
                    numbers.append(number)
            if len(lines) >= LINES_PER_BLOCK:
                yield _block(path, numbers, lines)
                lines, numbers = [], []
        if rest.strip():
            lines.append(rest)
            numbers.append(number + 1)
        if lines:
            yield _block(path, numbers, lines)


def _block(path: str, numbers: list[int], lines: list[bytes]) -> pa.Table:
    return pa.table({
        "source": pa.array([path] * len(lines), pa.string()),
        "line": pa.array(numbers, pa.int64()),
        "raw": pa.array(lines, pa.binary()),
    })
