"""Packing: every conversation lands in exactly one sequence, positions restart, no loss crosses a boundary,
and the model really keeps packed conversations apart."""

import random

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.chat import IGNORE
from pipelines.packing import CHUNK_ROWS, pack_batch, pack_lengths, unpacked_batch


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 64), min_size=0, max_size=300), st.integers(64, 200))
def test_bins_hold_every_row_once_and_never_overflow(lengths, max_length):
    bins = pack_lengths(lengths, max_length)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= max_length for b in bins)
    # best fit: no two bins could be merged into one (each pair together overflows)
    totals = sorted(sum(lengths[i] for i in b) for b in bins)
    assert len(totals) < 2 or totals[0] + totals[1] > max_length


def test_row_longer_than_max_length_is_refused():
    with pytest.raises(ValueError, match="longer than max_length"):
        pack_lengths([5, 11], 10)


def table(rows):
    return pa.table(
        {
            "input_ids": pa.array([r[0] for r in rows], pa.list_(pa.int32())),
            "labels": pa.array([r[1] for r in rows], pa.list_(pa.int32())),
            "num_tokens": pa.array([len(r[0]) for r in rows], pa.int32()),
            "key": pa.array([r[2] for r in rows], pa.int64()),
        }
    )


def test_packed_rows_restart_positions_and_mask_each_first_token():
    a = ([1, 2, 3, 4], [1, 2, 3, 4], 7)  # loss on everything (e.g. text)
    b = ([5, 6, 7], [IGNORE, 6, 7], -3)
    c = ([8, 9, 10, 11, 12, 13], [IGNORE, IGNORE, 10, 11, 12, 13], 99)
    out = pack_batch(table([a, b, c]), max_length=10, seed=1).to_pylist()
    assert len(out) == 2
    for row in out:
        assert len(row["input_ids"]) == len(row["labels"]) == len(row["position_ids"]) == row["num_tokens"] <= 10
    by_len = {row["num_tokens"]: row for row in out}
    # best fit decreasing: c (6) opens a sequence and a (4) fills it; b (3) needs a new one
    assert by_len[10]["input_ids"] == [8, 9, 10, 11, 12, 13, 1, 2, 3, 4]
    assert by_len[10]["position_ids"] == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]
    # a's first token is not predicted from c's last: its label is IGNORE; the rest is as it was
    assert by_len[10]["labels"] == [IGNORE, IGNORE, 10, 11, 12, 13, IGNORE, 2, 3, 4]
    assert by_len[3] == {"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7], "position_ids": [0, 1, 2], "num_tokens": 3}
    # deterministic: the same rows give the same sequences in the same order
    assert pack_batch(table([a, b, c]), max_length=10, seed=1).to_pylist() == out


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.lists(st.integers(0, 1000), min_size=1, max_size=40), min_size=0, max_size=60),
    st.integers(40, 100),
    st.integers(0, 5),
)
def test_packing_lays_out_each_bin_row_by_row(rows, max_length, slice_from):
    """Any rows (also a slice of a larger block, or none): each packed row is its bin's conversations one after
    another, labels as given but the first of each, positions from 0 for each."""
    rows = [(ids, [IGNORE if t % 3 == 0 else t for t in ids], (7 * i) - 50) for i, ids in enumerate(rows)]
    block = table([([1], [1], 0)] * slice_from + rows).slice(slice_from)
    out = pack_batch(block, max_length=max_length, seed=3).to_pylist()
    expected = []
    for start in range(0, len(rows), CHUNK_ROWS):
        chunk = rows[start : start + CHUNK_ROWS]
        bins = pack_lengths([len(r[0]) for r in chunk], max_length)
        random.Random(3 ^ min(r[2] for r in chunk)).shuffle(bins)
        for members in bins:
            ids, labels, pos = [], [], []
            for j in members:
                ids += chunk[j][0]
                labels += [IGNORE] + chunk[j][1][1:]
                pos += list(range(len(chunk[j][0])))
            expected.append({"input_ids": ids, "labels": labels, "position_ids": pos, "num_tokens": len(ids)})
    assert out == expected
    unpacked = unpacked_batch(block).to_pylist()
    assert [r["position_ids"] for r in unpacked] == [list(range(len(r[0]))) for r in rows]
    assert [r["input_ids"] for r in unpacked] == [r[0] for r in rows]


def test_unpacked_rows_keep_one_conversation_each():
    out = unpacked_batch(table([([1, 2, 3], [IGNORE, 2, 3], 0)])).to_pylist()
    assert out == [{"input_ids": [1, 2, 3], "labels": [IGNORE, 2, 3], "position_ids": [0, 1, 2], "num_tokens": 3}]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_model_keeps_packed_conversations_apart(artifacts, attn):
    """The loss of a packed sequence (chunked through the head) equals the plain losses of its conversations run
    one by one, with each attention implementation that runs on CPU."""
    from transformers import AutoModelForCausalLM

    from trainers.loop import Collate, check_packing_isolation
    from trainers.loss import TokenLoss

    model = AutoModelForCausalLM.from_pretrained(artifacts["model"], dtype=torch.float32, attn_implementation=attn)
    model.eval()
    assert model.config._attn_implementation == attn
    check_packing_isolation(model, "tiny")
    chunked, plain = TokenLoss(model, chunked=True, chunk=2), TokenLoss(model, chunked=False)
    a = ([5, 17, 29, 41, 53], [IGNORE, IGNORE, 29, 41, 53], 1)
    b = ([7, 19, 31, 43], [IGNORE, 19, 31, 43], 2)
    packed = pack_batch(table([a, b]), max_length=16, seed=0)
    collate = Collate(pad_id=0, device=torch.device("cpu"), packed=True)
    batch = collate({k: packed.column(k).to_numpy(zero_copy_only=False) for k in packed.column_names})
    with torch.no_grad():
        together = chunked(model, batch).item()
        apart = 0.0
        for ids, labels, _ in (a, b):
            one = Collate(pad_id=0, device=torch.device("cpu"), packed=False)(
                {
                    "input_ids": [ids],
                    "labels": [labels],
                    "position_ids": [list(range(len(ids)))],
                    "num_tokens": np.array([len(ids)]),
                }
            )
            apart += plain(model, one).item()
    assert together == pytest.approx(apart, rel=1e-5)
    assert batch["num_tokens"] == 9 and "attention_mask" not in batch


def test_a_model_that_ignores_packing_is_refused(artifacts):
    from transformers import AutoModelForCausalLM

    from core.errors import UserError
    from trainers.loop import check_packing_isolation

    model = AutoModelForCausalLM.from_pretrained(artifacts["model"], dtype=torch.float32).eval()
    plain = model.forward

    def leaky(input_ids, position_ids, use_cache):  # attends across the whole row, whatever the positions
        return plain(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=torch.ones_like(input_ids),
            use_cache=use_cache,
        )

    model.forward = leaky
    with pytest.raises(UserError, match="set data.packing: false"):
        check_packing_isolation(model, "leaky-model")
