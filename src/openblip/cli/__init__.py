"""The ``openblip`` command line: one subcommand per job.

Exit status: 0 success, 1 some inputs failed (the others still finished),
2 bad usage or a model/checkpoint that cannot be loaded.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .. import __version__
from . import capfilt, evaluate, inference, tools, train
from . import bootstrap
from .common import EXIT_USAGE, CliError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="openblip",
        description="BLIP: captioning, image-text matching, VQA, checkpoints, training and CapFilt.",
    )
    parser.add_argument("--version", action="version", version=f"openblip {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    inference.register(sub)
    train.register(sub)
    evaluate.register(sub)
    tools.register(sub)
    capfilt.register(sub)
    bootstrap.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except CliError as exc:
        print(f"openblip {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
