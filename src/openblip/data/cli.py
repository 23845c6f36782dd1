"""``openblip data ...``: build WebDataset shards from locally installed datasets.

    openblip data fashion-mnist --out DIR [--train-shards 6 --test-size N --seed 0 --limit N]
    openblip data openclipart --out DIR [--train-shards 4 --test-fraction 0.05 --max-side 384 ...]

The main CLI mounts this with `add_parser`; ``python -m openblip.data.cli ...`` works too.
Exit status: 0 on success, 2 when the Debian package is missing or the output folder
already holds shards (without ``--overwrite``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["add_parser", "main", "run"]


def _common(parser: argparse.ArgumentParser, train_shards: int) -> None:
    parser.add_argument("--out", required=True, help="output folder for the shards and stats.json")
    parser.add_argument("--train-shards", type=int, default=train_shards, help="number of training shards")
    parser.add_argument("--seed", type=int, default=0, help="seed for caption phrasing / training order")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N samples (smoke tests)")
    parser.add_argument("--source-dir", default=None, help="read the dataset from here instead of the package path")
    parser.add_argument("--overwrite", action="store_true", help="replace shards already in --out")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``data`` command (with ``fashion-mnist`` and ``openclipart``) to `subparsers`."""
    parser = subparsers.add_parser(
        "data",
        help="build WebDataset shards from Debian-packaged datasets",
        description="Build WebDataset shards (img2dataset layout) from datasets installed as Debian packages.",
    )
    commands = parser.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    fashion = commands.add_parser(
        "fashion-mnist",
        help="Fashion-MNIST (apt-get install dataset-fashion-mnist)",
        description="70k 28x28 product photos with captions phrased from the class name.",
    )
    _common(fashion, train_shards=6)
    fashion.add_argument("--test-size", type=int, default=None, help="test images to keep (default: all 10,000)")
    clipart = commands.add_parser(
        "openclipart",
        help="Open Clip Art Library (apt-get install openclipart-png openclipart-svg)",
        description="Clipart PNGs captioned with the title and description of their SVG.",
    )
    _common(clipart, train_shards=4)
    clipart.add_argument("--test-fraction", type=float, default=0.05, help="share of images in the test shard")
    clipart.add_argument("--max-side", type=int, default=384, help="downscale images larger than this")
    parser.set_defaults(run=run)  # the main CLI dispatches with args.run(args)
    return parser


def run(args: argparse.Namespace) -> int:
    """Build the dataset named by ``args.dataset``; returns the exit status."""
    from .builders import MissingPackageError

    try:
        stats = _build(args)
    except (MissingPackageError, FileExistsError) as exc:
        print(f"openblip data {args.dataset}: {exc}", file=sys.stderr)
        return 2
    train, test = stats["train"], stats["test"]
    print(
        f"{stats['dataset']}: {train['samples']} training samples in {train['shards']} shards, "
        f"{test['samples']} test samples; skipped {stats['skipped'] or 'none'}; {stats['seconds']} s"
    )
    print(f"train with:  --train-data '{train['pattern']}'")
    print(f"evaluate on: '{test['pattern']}'")
    return 0


def _build(args: argparse.Namespace) -> dict[str, Any]:
    common = {
        "train_shards": args.train_shards,
        "seed": args.seed,
        "limit": args.limit,
        "root": args.source_dir,
        "overwrite": args.overwrite,
    }
    if args.dataset == "fashion-mnist":
        from .builders import fashion_mnist

        return fashion_mnist.build(args.out, test_size=args.test_size, **common)
    from .builders import openclipart

    return openclipart.build(args.out, test_fraction=args.test_fraction, max_side=args.max_side, **common)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point for ``python -m openblip.data.cli``."""
    parser = argparse.ArgumentParser(prog="openblip")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
