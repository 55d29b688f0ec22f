"""Throughput of the preprocessing pipeline on this machine, as ratios measured in one run.

    .venv/bin/python bench/pipeline.py [--conversations 40000] [--cpus 2]

Three ways through the same conversations (the chatterbot corpus, repeated with numbered variations so that
nothing is a duplicate), each counted in tokens produced per second of wall time:

  zeray     the full Ray Data pipeline (`build_splits`): read, parse, clean, deduplicate, split, render the chat
            template, tokenize with labels in the actor pool, order and pack, into the object store
  limit     the tokenizer alone: its Rust backend's fastest batch encode (`encode_batch_fast`: ids, no offsets) of
            the already rendered texts, one process per core (the ceiling)
  datasets  Hugging Face `datasets`: load the JSON Lines and `map(num_proc=cpus)` the same parse + render +
            tokenize functions

It prints tokens/s for each and the two ratios the pipelines issue asks about: zeray / limit and zeray / datasets.
"""

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one core per process, as the comparison says

from pipelines.chat import ChatTokenizer  # noqa: E402
from pipelines.corpus import conversations, to_messages  # noqa: E402
from pipelines.formats import normalize  # noqa: E402

_tokenizer = None


def write_data(path: str, n: int) -> None:
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
    model_dir, texts = args
    backend = _load(model_dir).tokenizer.backend_tokenizer
    total = 0
    for start in range(0, len(texts), 256):
        total += sum(len(e.ids) for e in backend.encode_batch_fast(texts[start:start + 256], add_special_tokens=False))
    return total


def limit(model_dir: str, path: str, cpus: int) -> tuple[int, float]:
    """Tokens/s of batch-encoding the rendered texts, one process per core (rendering not timed)."""
    tokenizer = _load(model_dir)
    texts = [tokenizer.render(normalize(json.loads(line), "messages")).text for line in open(path, encoding="utf-8")]
    chunks = [texts[i::cpus] for i in range(cpus)]
    with multiprocessing.get_context("spawn").Pool(cpus) as pool:
        pool.map(_encode, [(model_dir, ["warm up"])] * cpus)  # start-up and tokenizer load are not timed
        started = time.perf_counter()
        tokens = sum(pool.map(_encode, [(model_dir, chunk) for chunk in chunks]))
        return tokens, time.perf_counter() - started


def _hf_map(batch, model_dir: str, max_length: int):
    tokenizer = _load(model_dir)
    convs = [normalize({"messages": m}, "messages") for m in batch["messages"]]
    out = tokenizer.tokenize_batch(convs, max_length)
    return {"input_ids": [t.input_ids for t in out], "labels": [t.labels for t in out]}


def hf_datasets(model_dir: str, path: str, cpus: int, max_length: int) -> tuple[int, float]:
    import datasets

    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory() as cache:
        started = time.perf_counter()
        ds = datasets.load_dataset("json", data_files=path, split="train", cache_dir=cache)
        ds = ds.map(_hf_map, batched=True, batch_size=256, num_proc=cpus, remove_columns=ds.column_names,
                    fn_kwargs=dict(model_dir=model_dir, max_length=max_length))
        tokens = sum(len(ids) for ids in ds["input_ids"])
        return tokens, time.perf_counter() - started


def zeray(model_dir: str, path: str, cpus: int, max_length: int) -> tuple[int, float]:
    import ray

    from pipelines.config import DataConfig
    from pipelines.dataset import build_splits

    from cluster.config import ClusterConfig
    from cluster.local import embedded_cpus

    # the logical CPUs `zeray train` would give its embedded Ray (2 training workers + the data share); the
    # physical cores are the machine's, which is what all three ways share
    ray.init(num_cpus=embedded_cpus(ClusterConfig(), train_cpus=cpus), include_dashboard=False,
             logging_level="ERROR")
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        data = DataConfig(train=path, format="messages", max_length=max_length)
        build_splits(data, model_dir)  # warm-up: worker processes, imports
        started = time.perf_counter()
        splits = build_splits(data, model_dir)
        elapsed = time.perf_counter() - started
        tokens = sum(int(getattr(splits, s).sum("num_tokens") or 0) for s in ("train", "val", "test"))
        return tokens, elapsed
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=40000)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=1024)
    args = parser.parse_args()

    from trainers.tiny_model import build_model

    with tempfile.TemporaryDirectory() as root:
        path, model_dir = os.path.join(root, "chat.jsonl"), os.path.join(root, "model")
        write_data(path, args.conversations)
        build_model(path, model_dir, size="tiny")
        results = {
            "limit": limit(model_dir, path, args.cpus),
            "datasets": hf_datasets(model_dir, path, args.cpus, args.max_length),
            "zeray": zeray(model_dir, path, args.cpus, args.max_length),
        }
    rate = {name: tokens / seconds for name, (tokens, seconds) in results.items()}
    print(f"{args.conversations} conversations, {args.cpus} cores")
    for name, (tokens, seconds) in results.items():
        print(f"  {name:9s} {tokens:>10d} tokens in {seconds:7.2f} s = {rate[name]:>10.0f} tokens/s")
    print(f"zeray / limit    = {rate['zeray'] / rate['limit']:.2f}  (target >= 0.80)")
    print(f"zeray / datasets = {rate['zeray'] / rate['datasets']:.2f}  (target > 1.00)")


if __name__ == "__main__":
    main()
