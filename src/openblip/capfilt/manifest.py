"""CapFilt bookkeeping files: per-shard decisions and stats, the run manifest and summary.

For an input shard ``NAME.tar`` the output directory holds, once the shard is finished::

    NAME.tar               the output shard (renamed into place last: its presence means "done")
    NAME.decisions.jsonl   one line per scored text: key, source (web|synthetic), text, itm, itc, kept
    NAME.stats.json        counts and seconds for the shard, and the rank that wrote it

and at the end of a run (rank 0, after every rank has finished)::

    manifest.jsonl         every decision of every finished shard, with a "shard" field
                           (manifest.parquet instead when pyarrow is installed, or on request)
    summary.json           counts, kept fractions by source, throughput, settings
    rank-RRRRR.json        what each rank did in the latest run (read for the throughput)
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..data.shards import atomic_write

__all__ = [
    "SOURCES",
    "decisions_path",
    "output_tar_path",
    "read_decisions",
    "stats_path",
    "write_json",
    "write_jsonl",
    "write_manifest",
    "write_summary",
]

SOURCES = ("web", "synthetic")
_PARQUET_SCHEMA = (("shard", "string"), ("key", "string"), ("source", "string"), ("text", "string"),
                   ("itm", "float64"), ("itc", "float64"), ("kept", "bool"))


def shard_name(input_path: str | os.PathLike) -> str:
    """``dir/train-00003.tar`` -> ``train-00003`` (the basename that names every output file)."""
    base = os.path.basename(os.fspath(input_path))
    return base[: -len(".tar")] if base.endswith(".tar") else base


def output_tar_path(output_dir: str | os.PathLike, input_path: str | os.PathLike) -> Path:
    return Path(output_dir) / f"{shard_name(input_path)}.tar"


def decisions_path(output_dir: str | os.PathLike, input_path: str | os.PathLike) -> Path:
    return Path(output_dir) / f"{shard_name(input_path)}.decisions.jsonl"


def stats_path(output_dir: str | os.PathLike, input_path: str | os.PathLike) -> Path:
    return Path(output_dir) / f"{shard_name(input_path)}.stats.json"


def rank_path(output_dir: str | os.PathLike, rank: int) -> Path:
    return Path(output_dir) / f"rank-{rank:05d}.json"


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write one JSON document atomically."""
    with atomic_write(path) as file:
        file.write((json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def write_jsonl(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> int:
    """Write records as JSON lines atomically; returns how many."""
    count = 0
    with atomic_write(path) as file:
        for record in records:
            file.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
            count += 1
    return count


def read_decisions(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as file:
        for line in file:
            if line.strip():
                yield json.loads(line)


def _finished(output_dir: Path, input_paths: Sequence[str]) -> tuple[list[str], list[str]]:
    done = [p for p in input_paths if output_tar_path(output_dir, p).exists()]
    return done, [p for p in input_paths if p not in set(done)]


def write_manifest(output_dir: str | os.PathLike, input_paths: Sequence[str], fmt: str = "auto") -> Path:
    """Concatenate the decisions of the finished shards, in input order, into one manifest.

    Args:
        fmt: ``"jsonl"``, ``"parquet"`` (needs pyarrow) or ``"auto"`` (parquet when pyarrow
            can be imported, else JSON lines). Streams shard by shard, so memory stays small.
    """
    output_dir = Path(output_dir)
    if fmt == "auto":
        fmt = "parquet" if _has_pyarrow() else "jsonl"
    if fmt not in ("jsonl", "parquet"):
        raise ValueError(f"manifest format must be auto, jsonl or parquet, got {fmt!r}")
    done, _ = _finished(output_dir, input_paths)
    rows = ({"shard": shard_name(p), **r} for p in done for r in read_decisions(decisions_path(output_dir, p)))
    if fmt == "jsonl":
        path = output_dir / "manifest.jsonl"
        write_jsonl(path, rows)
    else:
        path = output_dir / "manifest.parquet"
        _write_parquet(path, output_dir, done)
    return path


def _has_pyarrow() -> bool:
    try:
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        return False
    return True


def _write_parquet(path: Path, output_dir: Path, done: Sequence[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(name, getattr(pa, kind)()) for name, kind in _PARQUET_SCHEMA])
    with atomic_write(path) as file, pq.ParquetWriter(file, schema) as writer:
        for input_path in done:  # one row group per shard
            records = read_decisions(decisions_path(output_dir, input_path))
            rows = [{"shard": shard_name(input_path), **r} for r in records]
            writer.write_table(pa.Table.from_pylist(rows, schema=schema))


def write_summary(
    output_dir: str | os.PathLike,
    input_paths: Sequence[str],
    world_size: int,
    settings: dict[str, Any],
    manifest: Path,
) -> dict[str, Any]:
    """Add up the stats of every finished shard and this run's rank reports into ``summary.json``."""
    output_dir = Path(output_dir)
    done, missing = _finished(output_dir, input_paths)
    totals: dict[str, int] = {}
    for p in done:
        with open(stats_path(output_dir, p), encoding="utf-8") as file:
            for name, value in json.load(file)["counts"].items():
                totals[name] = totals.get(name, 0) + value
    summary = {
        "output_dir": str(output_dir),
        "manifest": manifest.name,
        "shards": {"total": len(input_paths), "finished": len(done), "missing": [shard_name(p) for p in missing]},
        "samples": totals.get("samples", 0),
        "image_errors": totals.get("image_errors", 0),
        "unreadable_input_shards": totals.get("shard_errors", 0),
        "samples_without_web_text": totals.get("no_web_text", 0),
        "samples_with_kept_text": totals.get("samples_with_kept_text", 0),
        "kept": {s: _fraction(totals.get(f"{s}_kept", 0), totals.get(f"{s}_scored", 0)) for s in SOURCES},
        "throughput": _throughput(output_dir, world_size),
        "settings": settings,
    }
    summary["kept"]["all"] = _fraction(
        sum(summary["kept"][s]["kept"] for s in SOURCES), sum(summary["kept"][s]["scored"] for s in SOURCES)
    )
    write_json(output_dir / "summary.json", summary)
    return summary


def _fraction(kept: int, scored: int) -> dict[str, Any]:
    return {"scored": scored, "kept": kept, "fraction": kept / scored if scored else None}


def _throughput(output_dir: Path, world_size: int) -> dict[str, Any]:
    """Images/s of the latest run: all ranks together, and per process on average."""
    reports = []
    for rank in range(world_size):
        path = rank_path(output_dir, rank)
        if path.exists():
            reports.append(json.loads(path.read_text(encoding="utf-8")))
    images = sum(r["images"] for r in reports)
    wall = max((r["seconds"] for r in reports), default=0.0)
    busy = sum(r["seconds"] for r in reports)
    return {
        "images": images,
        "shards_processed": sum(r["shards_processed"] for r in reports),
        "shards_skipped": sum(r["shards_skipped"] for r in reports),
        "wall_seconds": wall,
        "images_per_s": images / wall if wall > 0 else None,
        "images_per_s_per_process": images / busy if busy > 0 else None,
        "processes": len(reports),
    }
