"""``openblip convert`` and the dataset builders (``openblip data ...``)."""

from __future__ import annotations

import argparse

from .common import EXIT_OK, CliError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a checkpoint between formats",
        description="Read any supported checkpoint (hub id, transformers directory, official .pth, openblip "
                    "directory) and write it as an openblip directory or a transformers-format directory.",
    )
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST")
    p.add_argument("--to", choices=["openblip", "hf"], default="openblip", help="output format (default: openblip)")
    p.add_argument("--image-size", type=int, default=None, help="resize position embeddings to this image size")
    p.add_argument("--task", default=None, choices=["pretrain", "caption", "retrieval", "vqa", "feature"],
                   help="keep only the parts this task needs")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.set_defaults(run=run_convert)
    try:
        from ..data import cli as data_cli
    except ImportError:  # dataset builders are optional at import time
        return
    data_cli.add_parser(sub)


def run_convert(args: argparse.Namespace) -> int:
    from ..checkpoints import convert

    try:
        convert(args.src, args.dst, format=args.to, image_size=args.image_size, task=args.task,
                overwrite=args.overwrite)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise CliError(str(exc)) from exc
    print(f"wrote {args.dst} ({args.to} format)")
    return EXIT_OK
