"""`zeray prep`: run the pipeline once and write it down — Parquet per split, every reject with its reason, and a
report — so that training (`data.prepared`) and people can reuse and inspect it.

The output is written to a temporary folder beside the destination and moved into place at the end, so an
interrupted prep leaves the previous result (or nothing), never half a dataset; what a killed prep left beside it
is removed by the next one.
"""

import json
import os
import posixpath
import re
import socket

import numpy as np
import pyarrow.fs as pafs
import ray.data
from ray.data.expressions import col

from core.errors import UserError
from core.fs import entries, exists, files, is_local, kind, reach, read_bytes, resolve, write_bytes
from core.process import alive
from pipelines.config import DataConfig
from pipelines.dataset import SPLITS, Splits, build_splits, count_records, materialize_in_order, overriding

ROW_COLUMNS = ("input_ids", "labels", "position_ids", "num_tokens")
REPORT = "report.json"
REJECTS = "rejects.jsonl"
HISTOGRAM_EDGES = [0, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 1 << 20]


def prepare(
    data: DataConfig, model_path: str, out_dir: str, trust_remote_code: bool = False, wait_s: float | None = None
) -> dict:
    """Write `out_dir/{train,val,test}/*.parquet`, `rejects.jsonl` and `report.json` (`out_dir`: a path or a URI);
    returns the report. `wait_s`: how long the pipeline may wait for CPUs before it explains and stops."""
    splits = build_splits(data, model_path, trust_remote_code, wait_s=wait_s)
    fs, out = resolve(out_dir, "storage")
    remove_leftovers(fs, out)
    tag = str(os.getpid()) if is_local(fs) else f"{socket.gethostname()}-{os.getpid()}"
    tmp, old = f"{out}.tmp-{tag}", f"{out}.old-{tag}"
    fs.create_dir(tmp)
    try:
        for split in SPLITS:
            fs.create_dir(f"{tmp}/{split}")
            getattr(splits, split).write_parquet(f"{tmp}/{split}", filesystem=fs)
        write_rejects(splits, fs, f"{tmp}/{REJECTS}")
        report = build_report(splits, fs, tmp, data, model_path)
        write_bytes(fs, f"{tmp}/{REPORT}", json.dumps(report, indent=2, sort_keys=True).encode())
        if exists(fs, out):
            _move(fs, out, old)
        _move(fs, tmp, out)
    finally:
        for leftover in (tmp, old):
            if exists(fs, leftover):
                fs.delete_dir(leftover)
    return report


def _move(fs, src: str, dst: str) -> None:
    """Rename a folder: one rename on a local disk; on an object store (no folders to rename) file by file, the
    report last, since a data/ folder without report.json is never read."""
    if is_local(fs):
        os.replace(src, dst)
        return
    names = sorted(files(fs, src), key=lambda name: name == REPORT)
    for name in names:
        fs.move(f"{src}/{name}", f"{dst}/{name}")
    fs.delete_dir(src)


LEFTOVER = r"\.(tmp|old)-(?:(?P<host>.+)-)?(?P<pid>\d+)"


def remove_leftovers(fs, out_dir: str) -> None:
    """The temporary and replaced folders of preps into `out_dir` that were killed (their process, on this machine,
    is gone); a prep still running keeps its own, and so does one of another machine (on an object store)."""
    parent, name = posixpath.split(out_dir)
    for entry in entries(fs, parent):
        match = re.fullmatch(re.escape(name) + LEFTOVER, entry.base_name)
        if not match or (match["host"] or socket.gethostname()) != socket.gethostname():
            continue
        pid = int(match["pid"])
        if pid == os.getpid() or not alive(pid):  # our own pid on it: an earlier process's, reused
            fs.delete_dir(entry.path)


def write_rejects(splits: Splits, fs, path: str) -> None:
    """One JSON line per rejected record: source, line, reason, detail, and the original text to fix."""
    rejects = splits.records.filter(expr=col("reject") != "").select_columns(
        ["source", "line", "reject", "detail", "record"]
    )
    with fs.open_output_stream(path) as f:
        for row in rejects.iter_rows():
            f.write(
                (
                    json.dumps(
                        {
                            "source": row["source"],
                            "line": row["line"],
                            "reason": row["reject"],
                            "detail": row["detail"],
                            "record": row["record"],
                        },
                        ensure_ascii=False,
                    )
                    + "\n"
                ).encode()
            )


def build_report(splits: Splits, fs, out_dir: str, data: DataConfig, model_path: str) -> dict:
    """Counts from what was written (not from what was planned), with both accounting identities checked:
    every record is out or rejected, and every token of an accepted record is in its split's rows."""
    counts = count_records(splits.records, splits.sources)
    accepted = splits.records.filter(expr=col("reject") == "")
    expected_tokens = {s: 0 for s in SPLITS}
    # (a mixture's training split holds each record as many times as it was drawn)
    drawn = "drawn_tokens" if len(splits.sources) > 1 else "num_tokens"
    for row in accepted.groupby("split").sum(drawn).take_all():
        expected_tokens[row["split"]] = row[f"sum({drawn})"]
    rows, tokens = {}, {}
    histogram = np.zeros(len(HISTOGRAM_EDGES) - 1, dtype=np.int64)
    for split in SPLITS:
        rows[split] = tokens[split] = 0
        ds = _read_split(fs, out_dir, split, columns=["num_tokens"])
        if ds is None:
            continue
        for batch in ds.iter_batches(batch_format="numpy", batch_size=65536):
            lengths = batch["num_tokens"]
            rows[split] += len(lengths)
            tokens[split] += int(lengths.sum())
            # bins (lo, hi]: a sequence of exactly max_length belongs to the bin that ends there
            bins = np.searchsorted(HISTOGRAM_EDGES, lengths, side="left") - 1
            histogram += np.bincount(bins, minlength=len(histogram))[: len(histogram)]
    records_out = sum(counts["records"].values())
    rejected = sum(counts["rejected"].values())
    lines = _count_lines(fs, f"{out_dir}/{REJECTS}")
    if counts["records_in"] != records_out + rejected or lines != rejected or tokens != expected_tokens:
        raise RuntimeError(
            f"accounting failed: {counts['records_in']} records in, {records_out} out + {rejected} "
            f"rejected ({lines} lines in {REJECTS}); tokens written {tokens}, expected "
            f"{expected_tokens}; nothing was written in place"
        )
    return {
        "records_in": counts["records_in"],
        "records_out": records_out,
        "records": counts["records"],
        "rejected": counts["rejected"],
        "truncated": counts["truncated"],
        "rows": rows,
        "tokens": tokens,
        "packing": data.packing,
        # real tokens per slot of max_length: how full the packed sequences are (padding is the rest)
        "packing_efficiency": {
            s: round(tokens[s] / (rows[s] * data.max_length), 4) if rows[s] else None for s in SPLITS
        },
        "format": splits.format,
        "files": splits.files,
        **({"sources": counts["sources"]} if "sources" in counts else {}),
        "max_length": data.max_length,
        "split": data.split.model_dump(),
        "model": model_path,
        "length_histogram": {
            f"{lo + 1}-{hi}": int(n)
            for lo, hi, n in zip(HISTOGRAM_EDGES[:-1], HISTOGRAM_EDGES[1:], histogram)
            if lo < data.max_length
        },
    }


def load_prepared(path: str, splits: tuple[str, ...] = SPLITS) -> tuple[dict[str, ray.data.Dataset], dict]:
    """The datasets (`splits` of them) and report of a `zeray prep` output folder (`data.prepared`), read once into
    Ray's object store in file order (as the streamed pipeline leaves its splits): epochs and evaluations then
    iterate over blocks already there, instead of each re-reading Parquet in tasks that compete with training for
    CPUs."""
    fs, root = reach(path, "data.prepared")
    if kind(fs, f"{root}/{REPORT}") != pafs.FileType.File:
        raise UserError(f"data.prepared: {path} has no {REPORT}; point it at the data/ folder `zeray prep` wrote")
    report = json.loads(read_bytes(fs, f"{root}/{REPORT}"))
    if "packing" not in report:
        raise UserError(
            f"data.prepared: {path} was written by an older zeray (no packing fields); run `zeray prep` again"
        )
    datasets = {}
    for split in splits:
        ds = _read_split(fs, root, split, columns=list(ROW_COLUMNS))
        if ds is None:
            raise UserError(f"data.prepared: {path}/{split} holds no Parquet rows; run `zeray prep` again")
        datasets[split] = materialize_in_order(ds)
    return datasets, report


def summary_line(report: dict) -> str:
    rej = ", ".join(f"{k} {v}" for k, v in report["rejected"].items()) or "none"
    records, rows, tokens = report["records"], report["rows"], report["tokens"]
    packed = (
        f", packing efficiency {report['packing_efficiency']['train']:.0%}"
        if report["packing"] and rows["train"]
        else ""
    )
    return (
        f"{report['records_in']} records in -> {report['records_out']} out (train {records['train']} / val "
        f"{records['val']} / test {records['test']}), rejected: {rej}; truncated {report['truncated']}; "
        f"train {rows['train']} rows, {tokens['train']} tokens{packed}"
    )


def source_lines(counts: dict) -> list[str]:
    """One line per source of a mixture: what it brought, and what the training epoch draws from it."""
    return [
        f"data: source {source['path']} ({source['format']}, weight {source['weight']:g}): "
        f"{source['records_in']} records in, train {source['records']['train']} drawn {source['drawn']} times, "
        f"{source['token_share']:.1%} of training tokens"
        for source in counts.get("sources", [])
    ]


def _read_split(fs, root: str, split: str, columns: list[str]):
    folder = f"{root}/{split}"
    parquet = sum(name.endswith(".parquet") for name in files(fs, folder))
    if not parquet:
        return None
    # Ray Data's first Parquet reader: its second lists files through footer-reading actors, a new process per
    # read (2-6 s for a split of a few hundred rows on 2 cores, against 0.3-1 s; a run reads three splits)
    with overriding(ray.data.DataContext.get_current(), use_datasource_v2=False):
        # a block per file, as prep wrote them (one per block of the pipeline): Ray's default cuts files into as
        # many blocks as the cluster has CPUs, and the training order's shuffle buffer depends on the blocks
        return ray.data.read_parquet(folder, filesystem=fs, override_num_blocks=parquet).select_columns(columns)


def _count_lines(fs, path: str) -> int:
    lines = 0
    with fs.open_input_stream(path) as f:
        while chunk := f.read(1 << 20):
            lines += chunk.count(b"\n")
    return lines
