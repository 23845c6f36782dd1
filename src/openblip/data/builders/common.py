"""What every dataset builder shares: package checks, output folder, stats file."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..shards import atomic_write

__all__ = ["MissingPackageError", "prepare_output", "shard_pattern", "shard_size", "write_stats"]


class MissingPackageError(RuntimeError):
    """A dataset's Debian package is not installed; the message says how to install it."""

    def __init__(self, packages: Sequence[str], looked_in: str | os.PathLike) -> None:
        names = " ".join(packages)
        super().__init__(
            f"{looked_in} not found or incomplete: install the Debian package(s) with\n"
            f"    apt-get install -y {names}\n"
            f"(or point --source-dir at a copy of the files)"
        )
        self.packages = tuple(packages)


def prepare_output(out: Path, overwrite: bool) -> None:
    """Create `out`; refuse to mix with shards of an earlier build unless `overwrite`.

    Stale shards would otherwise still match ``train-*.tar`` globs after a rebuild
    with fewer shards.
    """
    out.mkdir(parents=True, exist_ok=True)
    existing = sorted(out.glob("train-*.tar")) + sorted(out.glob("test-*.tar"))
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds shards ({existing[0].name}, ...); pass --overwrite to replace them")
    for path in existing:
        path.unlink()
    # Temporary files of a build that was killed (SIGKILL/SIGTERM skip the cleanup).
    for path in list(out.glob(".train-*.tmp")) + list(out.glob(".test-*.tmp")):
        path.unlink()


def shard_size(count: int, shards: int) -> int:
    """Samples per shard so that `count` samples fill `shards` shards (the last may be shorter)."""
    return max(1, math.ceil(count / max(shards, 1)))


def shard_pattern(paths: Sequence[str]) -> str:
    """The brace pattern naming `paths` (``dir/train-{00000..00005}.tar``), for ``--train-data``."""
    if not paths:
        return ""
    if len(paths) == 1:
        return str(paths[0])
    first, last = Path(paths[0]), Path(paths[-1])
    prefix, low = first.stem.rsplit("-", 1)
    high = last.stem.rsplit("-", 1)[1]
    return str(first.parent / f"{prefix}-{{{low}..{high}}}{first.suffix}")


def write_stats(path: Path, stats: dict[str, Any]) -> None:
    """Write `stats` as indented JSON, atomically."""
    with atomic_write(path) as file:
        file.write((json.dumps(stats, indent=2, sort_keys=True) + "\n").encode("utf-8"))
