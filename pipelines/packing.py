"""Packing: several tokenized conversations per training sequence, up to `max_length` tokens.

Each conversation keeps its own positions (`position_ids` restart at 0), so a model that isolates packed
sequences by their positions (transformers does, given `position_ids` and no attention mask) never lets one
conversation attend to another; the first token of every conversation carries no label, so no loss crosses a
boundary either. Packing is best-fit decreasing within chunks of rows, which wastes few slots and is
deterministic: the same rows in, the same sequences out.
"""

import bisect
import random

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.chat import IGNORE

CHUNK_ROWS = 2048  # rows packed together: larger fills sequences better, smaller bounds the work per step


def pack_lengths(lengths: list[int], max_length: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins of total length <= max_length (best fit, longest first)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    free: list[tuple[int, int]] = []  # (room left, bin number), kept sorted by room
    bins: list[list[int]] = []
    for i in order:
        n = lengths[i]
        if n > max_length:
            raise ValueError(f"row of {n} tokens is longer than max_length {max_length}")
        at = bisect.bisect_left(free, (n, -1))  # the bin with the least room that still fits
        if at < len(free):
            room, b = free.pop(at)
        else:
            room, b = max_length, len(bins)
            bins.append([])
        bins[b].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, b))
    return bins


def pack_batch(batch: pa.Table, max_length: int, seed: int) -> pa.Table:
    """Ray Data map: rows of `input_ids, labels, key` → packed rows of
    `input_ids, labels, position_ids, num_tokens`.

    The packed rows are shuffled with a seed drawn from the chunk's own keys: best-fit emits the longest first,
    and a training stream sorted by length would be a biased one. Only the bin choice runs per row in Python;
    the tokens move as whole Arrow/NumPy arrays.
    """
    ids_col, labels_col = _lists(batch, "input_ids"), _lists(batch, "labels")
    lengths = pc.list_value_length(ids_col).to_numpy(zero_copy_only=False)
    keys = batch.column("key").to_numpy()
    order: list[int] = []  # input rows in the order their tokens are laid out
    sizes: list[int] = []  # input rows per packed row
    for start in range(0, len(lengths), CHUNK_ROWS):
        chunk = lengths[start : start + CHUNK_ROWS].tolist()
        bins = pack_lengths(chunk, max_length)
        random.Random(seed ^ int(keys[start : start + len(chunk)].min())).shuffle(bins)
        for members in bins:
            order.extend(start + j for j in members)
            sizes.append(len(members))
    taken = np.asarray(order, dtype=np.int64)
    row_lengths = lengths[taken]
    row_ends = np.cumsum(row_lengths)
    row_starts = row_ends - row_lengths
    ids = _values(ids_col, taken)
    labels = _values(labels_col, taken)
    labels[row_starts[row_lengths > 0]] = IGNORE  # nothing predicts a conversation's first token
    position = np.arange(len(ids), dtype=np.int32) - np.repeat(row_starts, row_lengths).astype(np.int32)
    # each packed row ends where its last member ends
    offsets = np.concatenate([[0], row_ends[np.cumsum(sizes, dtype=np.int64) - 1]]).astype(np.int32)
    return pa.table(
        {
            "input_ids": pa.ListArray.from_arrays(offsets, pa.array(ids, pa.int32())),
            "labels": pa.ListArray.from_arrays(offsets, pa.array(labels, pa.int32())),
            "position_ids": pa.ListArray.from_arrays(offsets, pa.array(position, pa.int32())),
            "num_tokens": pa.array(np.diff(offsets), pa.int32()),
        }
    )


def unpacked_batch(batch: pa.Table) -> pa.Table:
    """Without packing: one conversation per row, in the same schema as packed rows."""
    ids = _lists(batch, "input_ids")
    offsets = ids.offsets.to_numpy()
    lengths = np.diff(offsets)
    position = np.arange(offsets[-1] - offsets[0], dtype=np.int32) - np.repeat(offsets[:-1] - offsets[0], lengths)
    return pa.table(
        {
            "input_ids": batch.column("input_ids"),
            "labels": batch.column("labels"),
            "position_ids": pa.ListArray.from_arrays(
                pa.array(offsets - offsets[0], pa.int32()), pa.array(position, pa.int32())
            ),
            "num_tokens": batch.column("num_tokens"),
        }
    )


def _lists(batch: pa.Table, name: str) -> pa.ListArray:
    column = batch.column(name)
    return column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)


def _values(lists: pa.ListArray, rows: np.ndarray) -> np.ndarray:
    """The tokens of `rows`, one after another, as one new (writable) int32 array."""
    return pc.list_flatten(lists.take(pa.array(rows, pa.int64()))).to_numpy(zero_copy_only=False).astype(np.int32)
