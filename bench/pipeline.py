"""Throughput of the preprocessing pipeline on this machine, as ratios measured in one run.

    .venv/bin/python bench/pipeline.py [--profile short|long|both] [--conversations N] [--cpus 2]

Three ways through the same conversations (the chatterbot corpus, repeated with numbered variations so that
nothing is a duplicate; `short`: its own conversations, `long`: six turns of a paragraph each), each counted in
tokens produced per second of wall time:

  zeray     the full Ray Data pipeline (`build_splits`): read, parse, clean, deduplicate, split, render the chat
            template, tokenize with labels in the actor pool, order and pack, into the object store
  limit     the tokenizer alone: its batch call (`tokenizer(texts)`) on the already rendered texts, one process per
            core (the ceiling); also shown: its Rust backend's `encode_batch_fast` (ids only, no offsets), lower still
  datasets  Hugging Face `datasets` doing the same work: load the JSON Lines, `map(num_proc=cpus)` the same parse,
            clean, split, hash, render and tokenize functions, drop duplicates across the whole dataset, and per
            split `select` the rows in the seeded order and `map(num_proc=cpus)` the same packing; also shown
            (`ds-map`): its map of the per-record work alone (parse, clean, render, tokenize), with no duplicate
            check, split, order or packing

It prints tokens/s for each and the two ratios the pipelines issue asks about: zeray / limit and zeray / datasets.
"""

import argparse
import hashlib
import json
import logging
import multiprocessing
import os
import sys
import tempfile
import time

import numpy as np
import pyarrow.compute as pc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one core per process, as the comparison says

from pipelines.chat import ChatTokenizer  # noqa: E402
from pipelines.corpus import conversations, to_messages  # noqa: E402
from pipelines.formats import Reject, normalize  # noqa: E402

_tokenizer = None


def write_data(path: str, n: int, turns: int = 0, per_message: int = 1) -> None:
    """`n` conversations: the corpus's own (`turns` 0), or `turns` messages of `per_message` consecutive
    utterances each, taken in order through the whole corpus."""
    if turns:
        utterances = [u for _, _, conv in conversations() for u in conv]
        step = turns * per_message
        base = [
            to_messages(
                [
                    " ".join(utterances[(k * step + t * per_message + j) % len(utterances)] for j in range(per_message))
                    for t in range(turns)
                ]
            )
            for k in range(len(utterances) // step)
        ]
    else:
        base = [to_messages(u) for _, _, u in conversations()]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            messages = [dict(m) for m in base[i % len(base)]]
            messages[0]["content"] += f" (#{i})"  # distinct conversations: the dedup keeps all
            f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")


def _load(model_dir: str):
    global _tokenizer
    if _tokenizer is None:
        from pipelines.dataset import load_tokenizer

        _tokenizer = ChatTokenizer(load_tokenizer(model_dir))
    return _tokenizer


def _encode(args) -> int:
    model_dir, texts, rust = args
    tokenizer = _load(model_dir).tokenizer
    total = 0
    for start in range(0, len(texts), 256):
        batch = texts[start : start + 256]
        if rust:
            encoded = tokenizer.backend_tokenizer.encode_batch_fast(batch, add_special_tokens=False)
            total += sum(len(e.ids) for e in encoded)
        else:
            total += sum(len(ids) for ids in tokenizer(batch, add_special_tokens=False)["input_ids"])
    return total


def limit(model_dir: str, path: str, cpus: int, rust: bool = False) -> tuple[int, float]:
    """Batch-encoding the rendered texts, one process per core (rendering not timed): with the tokenizer's own
    call, or (`rust`) its Rust backend's `encode_batch_fast`."""
    tokenizer = _load(model_dir)
    texts = [tokenizer.render(normalize(json.loads(line), "messages")).text for line in open(path, encoding="utf-8")]
    chunks = [texts[i::cpus] for i in range(cpus)]
    with multiprocessing.get_context("spawn").Pool(cpus) as pool:
        pool.map(_encode, [(model_dir, ["warm up"], rust)] * cpus)  # start-up and tokenizer load are not timed
        started = time.perf_counter()
        tokens = sum(pool.map(_encode, [(model_dir, chunk, rust) for chunk in chunks]))
        return tokens, time.perf_counter() - started


def _hf_tokenize(batch, model_dir: str, max_length: int):
    """parse + render + tokenize only (the per-record work, no dedup, split, order or packing)"""
    tokenizer = _load(model_dir)
    convs = [normalize({"messages": m}, "messages") for m in batch["messages"]]
    out = tokenizer.tokenize_batch(convs, max_length)
    return {"input_ids": [t.input_ids for t in out], "labels": [t.labels for t in out]}


def hf_datasets_map(model_dir: str, path: str, cpus: int, max_length: int) -> tuple[int, float]:
    """`datasets.map` of the per-record work alone (parse, clean, render, tokenize with labels)."""
    import datasets

    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory() as cache:
        started = time.perf_counter()
        ds = datasets.load_dataset("json", data_files=path, split="train", cache_dir=cache)
        ds = ds.map(
            _hf_tokenize,
            batched=True,
            batch_size=256,
            num_proc=cpus,
            remove_columns=ds.column_names,
            fn_kwargs=dict(model_dir=model_dir, max_length=max_length),
        )
        tokens = sum(len(ids) for ids in ds["input_ids"])
        return tokens, time.perf_counter() - started


def _hf_prepare(batch, model_dir: str, max_length: int, seed: int):
    """Per record, what zeray's parse and tokenize stages produce: a reject reason or the cleaned conversation's
    split, order key and a 128-bit digest for the duplicate check, then its tokens and labels."""
    from pipelines.dataset import order_key, split_of

    tokenizer = _load(model_dir)
    n = len(batch["messages"])
    reject, split, key, digest, convs, todo = [""] * n, [""] * n, [0] * n, [b""] * n, [], []
    for i, messages in enumerate(batch["messages"]):
        try:
            turns = normalize({"messages": messages}, "messages")
        except Reject as rej:
            reject[i] = rej.reason
            continue
        conversation = json.dumps(turns, ensure_ascii=False, sort_keys=True)
        split[i], key[i] = split_of(conversation, 0.1, 0.1, seed), order_key(conversation, seed)
        digest[i] = hashlib.blake2b(conversation.encode("utf-8"), digest_size=16).digest()
        convs.append(turns)
        todo.append(i)
    input_ids, labels = [[] for _ in range(n)], [[] for _ in range(n)]
    for i, tok in zip(todo, tokenizer.tokenize_batch(convs, max_length)):
        if tok.problem in ("too_long", "template_error"):
            reject[i] = tok.problem
        input_ids[i], labels[i] = tok.input_ids, tok.labels
    return {"reject": reject, "split": split, "key": key, "digest": digest, "input_ids": input_ids, "labels": labels}


def hf_datasets(model_dir: str, path: str, cpus: int, max_length: int) -> tuple[int, float]:
    """The same work as zeray's pipeline, the way `datasets` does it: `map(num_proc)` parses, cleans, splits and
    tokenizes; the driver finds exact duplicates across the whole dataset by digest (keeping the first), then per
    split `select`s the kept rows in seeded order and `map(num_proc)` packs them (the same packing code)."""
    import datasets
    import pandas as pd

    from pipelines.packing import CHUNK_ROWS, pack_batch

    datasets.disable_progress_bars()
    seed = 42
    with tempfile.TemporaryDirectory() as cache:
        started = time.perf_counter()
        ds = datasets.load_dataset("json", data_files=path, split="train", cache_dir=cache)
        ds = ds.map(
            _hf_prepare,
            batched=True,
            batch_size=256,
            num_proc=cpus,
            remove_columns=ds.column_names,
            fn_kwargs=dict(model_dir=model_dir, max_length=max_length, seed=seed),
        )
        table = ds.data.table
        kept = (
            pd.Series(table.column("reject").to_numpy(zero_copy_only=False) == "")
            & ~pd.Series(table.column("digest").to_pylist()).duplicated()
        )
        keys, splits = table.column("key").to_numpy(), table.column("split").to_numpy(zero_copy_only=False)
        tokens = 0
        for split in ("train", "val", "test"):
            rows = np.flatnonzero(kept.to_numpy() & (splits == split))
            rows = rows[np.argsort(keys[rows], kind="stable")]
            packed = (
                ds.select(rows)
                .select_columns(["input_ids", "labels", "key"])
                .with_format("arrow")
                .map(
                    pack_batch,
                    batched=True,
                    batch_size=CHUNK_ROWS,
                    num_proc=cpus,
                    remove_columns=["key"],
                    fn_kwargs=dict(max_length=max_length, seed=seed),
                )
            )
            tokens += int(pc.sum(packed.data.table.column("num_tokens")).as_py() or 0)
        return tokens, time.perf_counter() - started


def zeray(model_dir: str, path: str, cpus: int, max_length: int) -> tuple[int, float, float]:
    import ray

    from cluster.config import ClusterConfig
    from cluster.local import embedded_cpus, embedded_system_config
    from pipelines.config import DataConfig
    from pipelines.dataset import build_splits

    # the embedded Ray `zeray train` would start (2 training workers + the data share); the physical cores are
    # the machine's, which is what all three ways share
    num_cpus = embedded_cpus(ClusterConfig(), train_cpus=cpus)
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        logging_level="ERROR",
        _system_config=embedded_system_config(num_cpus),
    )
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # not a line per execution
        data = DataConfig(train=path, format="messages", max_length=max_length)
        started = time.perf_counter()
        build_splits(data, model_dir)  # warm-up: worker processes, imports (what a fresh `zeray prep` pays too)
        cold = time.perf_counter() - started
        started = time.perf_counter()
        splits = build_splits(data, model_dir)
        elapsed = time.perf_counter() - started
        tokens = sum(int(getattr(splits, s).sum("num_tokens") or 0) for s in ("train", "val", "test"))
        return tokens, elapsed, cold
    finally:
        ray.shutdown()


PROFILES = {
    # the corpus as it is: 2-3 short turns, ~50 tokens a conversation (per-conversation costs weigh most)
    "short": dict(conversations=40000, turns=0, per_message=1, max_length=1024),
    # fine-tuning data's usual shape: 6 turns of a paragraph each, ~600 tokens a conversation
    "long": dict(conversations=10000, turns=6, per_message=6, max_length=4096),
}


def run(profile: str, model_dir: str, root: str, cpus: int, conversations: int | None) -> None:
    spec = PROFILES[profile]
    n = conversations or spec["conversations"]
    path = os.path.join(root, f"{profile}.jsonl")
    write_data(path, n, spec["turns"], spec["per_message"])
    results = {
        "limit": limit(model_dir, path, cpus),
        "rust": limit(model_dir, path, cpus, rust=True),
        "datasets": hf_datasets(model_dir, path, cpus, spec["max_length"]),
        "ds-map": hf_datasets_map(model_dir, path, cpus, spec["max_length"]),
        "zeray": zeray(model_dir, path, cpus, spec["max_length"]),
    }
    tokens, seconds, cold = results["zeray"]
    results["zeray"] = tokens, seconds
    rate = {name: tokens / seconds for name, (tokens, seconds) in results.items()}
    print(f"{profile}: {n} conversations, {results['limit'][0] / n:.0f} tokens each, {cpus} cores")
    for name, (tokens, seconds) in results.items():
        print(f"  {name:9s} {tokens:>10d} tokens in {seconds:7.2f} s = {rate[name]:>10.0f} tokens/s")
    print(
        f"  (zeray's first run in its Ray, as a fresh `zeray prep` runs, with worker processes starting: {cold:.2f} s)"
    )
    print(
        f"  zeray / limit    = {rate['zeray'] / rate['limit']:.2f}  (target >= 0.80; "
        f"against encode_batch_fast {rate['zeray'] / rate['rust']:.2f})"
    )
    print(
        f"  zeray / datasets = {rate['zeray'] / rate['datasets']:.2f}  (target > 1.00; against its map of the "
        f"per-record work alone {rate['zeray'] / rate['ds-map']:.2f})",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=[*PROFILES, "both"], default="both")
    parser.add_argument("--conversations", type=int, help="instead of the profile's number")
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args()

    from trainers.tiny_model import build_model

    with tempfile.TemporaryDirectory() as root:
        corpus, model_dir = os.path.join(root, "corpus.jsonl"), os.path.join(root, "model")
        write_data(corpus, 4000)
        build_model(corpus, model_dir, size="tiny")
        for profile in PROFILES if args.profile == "both" else [args.profile]:
            run(profile, model_dir, root, args.cpus, args.conversations)


if __name__ == "__main__":
    main()
