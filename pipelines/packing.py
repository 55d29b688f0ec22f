"""Packing: several tokenized conversations per training sequence, up to `max_length` tokens.

Each conversation keeps its own positions (`position_ids` restart at 0), so a model that isolates packed
sequences by their positions (transformers does, given `position_ids` and no attention mask) never lets one
conversation attend to another; the first token of every conversation carries no label, so no loss crosses a
boundary either. Packing is best-fit decreasing within chunks of rows, which wastes few slots and is
deterministic: the same rows in, the same sequences out.
"""

import bisect
import random

import pyarrow as pa

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
    and a training stream sorted by length would be a biased one.
    """
    ids_col = batch.column("input_ids").to_pylist()
    labels_col = batch.column("labels").to_pylist()
    keys = batch.column("key").to_pylist()
    out_ids, out_labels, out_pos = [], [], []
    for start in range(0, len(ids_col), CHUNK_ROWS):
        chunk = range(start, min(start + CHUNK_ROWS, len(ids_col)))
        bins = pack_lengths([len(ids_col[i]) for i in chunk], max_length)
        random.Random(seed ^ min(keys[i] for i in chunk)).shuffle(bins)
        for members in bins:
            ids, labels, pos = [], [], []
            for j in members:
                row_ids, row_labels = ids_col[start + j], labels_col[start + j]
                ids.extend(row_ids)
                labels.append(IGNORE)  # nothing predicts a conversation's first token
                labels.extend(row_labels[1:])
                pos.extend(range(len(row_ids)))
            out_ids.append(ids)
            out_labels.append(labels)
            out_pos.append(pos)
    return pa.table({
        "input_ids": pa.array(out_ids, pa.list_(pa.int32())),
        "labels": pa.array(out_labels, pa.list_(pa.int32())),
        "position_ids": pa.array(out_pos, pa.list_(pa.int32())),
        "num_tokens": pa.array([len(x) for x in out_ids], pa.int32()),
    })


def unpacked_batch(batch: pa.Table) -> pa.Table:
    """Without packing: one conversation per row, in the same schema as packed rows."""
    ids = batch.column("input_ids").to_pylist()
    return pa.table({
        "input_ids": batch.column("input_ids"),
        "labels": batch.column("labels"),
        "position_ids": pa.array([list(range(len(x))) for x in ids], pa.list_(pa.int32())),
        "num_tokens": batch.column("num_tokens"),
    })
