"""Shared pieces of the command line: errors, model loading, output, progress."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

EXIT_OK, EXIT_PARTIAL, EXIT_USAGE = 0, 1, 2


class CliError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


def add_model_args(parser: argparse.ArgumentParser, default_model: str) -> None:
    parser.add_argument(
        "--model",
        default=default_model,
        help=f"hub id, transformers-format directory, official .pth or openblip directory (default: {default_model})",
    )
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                        help="precision (default: fp32); bf16 and fp16 halve the weight memory (README: Speed)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--image-size", type=int, default=None, help="run at this image size (resizes positions)")


def add_output_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=["text", "jsonl"], default="text", help="output format (default: text)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def load_blip(args: argparse.Namespace, **kwargs: Any):
    """Load the model named by ``--model``; any loading problem becomes a CliError."""
    from ..api import Blip

    if getattr(args, "image_size", None):
        kwargs["image_size"] = args.image_size
    try:
        return Blip.from_pretrained(args.model, device=args.device, dtype=args.dtype, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise CliError(f"cannot load model {args.model!r}: {exc}") from exc


def emit(args: argparse.Namespace, record: dict[str, Any], text: str) -> None:
    """Print one result as a JSON line or as tab-separated text."""
    line = json.dumps(record, ensure_ascii=False) if args.format == "jsonl" else text
    print(line, flush=True)


def report_failure(args: argparse.Namespace, record: dict[str, Any]) -> None:
    """A failed input: a message on stderr, and a record with "error" in JSONL output."""
    print(f"openblip {args.command}: {record['error']}", file=sys.stderr, flush=True)
    if args.format == "jsonl":
        print(json.dumps(record, ensure_ascii=False), flush=True)


def progress(args: argparse.Namespace, total: int, desc: str):
    """A tqdm bar on stderr for runs of more than one item."""
    from tqdm import tqdm

    disable = args.no_progress or total <= 1
    return tqdm(total=total, desc=desc, unit="img", disable=disable, file=sys.stderr, leave=False)
