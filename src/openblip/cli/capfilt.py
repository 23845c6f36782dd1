"""``openblip capfilt``: caption and filter WebDataset shards, one process or many (torchrun)."""

from __future__ import annotations

import argparse
import datetime
from typing import Any

from .common import EXIT_OK, EXIT_PARTIAL, CliError, load_blip

CAPTIONER = "Salesforce/blip-image-captioning-base"  # COCO-finetuned captioner (reference C, E.4)
FILTER = "Salesforce/blip-itm-base-coco"  # COCO-finetuned retrieval model
# Ranks finish their shards at different times and then wait in one barrier; the default
# collective timeout (minutes) would abort a job whose ranks are unevenly loaded.
BARRIER_TIMEOUT = datetime.timedelta(hours=48)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "capfilt", help="bootstrap web shards: synthetic captions + ITM filtering (CapFilt)",
        description="For every image of the input shards, sample synthetic captions with the captioner and keep "
                    "the web and synthetic texts that the filter's ITM head matches with the image "
                    "(probability >= threshold). Writes one output shard per input shard, per-shard decisions, "
                    "a manifest and summary.json. Rerun the same command to finish an interrupted run; "
                    "launch with torchrun --nproc_per_node N to split the shards over N processes.",
    )
    p.add_argument("--captioner", default=CAPTIONER, help=f"captioning model (default: {CAPTIONER})")
    p.add_argument("--filter", default=FILTER, help=f"retrieval model with an ITM head (default: {FILTER})")
    p.add_argument("--input", required=True, metavar="SHARDS",
                   help='input shards: "dir/{00000..00099}.tar", globs, a directory, "::" between lists')
    p.add_argument("--output", required=True, metavar="DIR", help="output directory")
    p.add_argument("--num-captions", type=int, default=1,
                   help="synthetic captions per image (default: 1); 0 = filter the web texts only, no captioner "
                        "is loaded")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus mass (default: 0.9, as BLIP)")
    p.add_argument("--top-k", type=int, default=50,
                   help="top-k before top-p, 0 = off (default: 50, transformers' default in BLIP's sampling)")
    p.add_argument("--repetition-penalty", type=float, default=1.1, help="(default: 1.1, as BLIP)")
    p.add_argument("--max-length", type=int, default=30, help="max tokens incl. [DEC] and prompt (default: 30)")
    p.add_argument("--min-length", type=int, default=10, help="min tokens incl. [DEC] and prompt (default: 10)")
    p.add_argument("--prompt", default=None, help="caption prompt (default: the captioner's, 'a picture of ')")
    p.add_argument("--threshold", type=float, default=None,
                   help="keep a text when its ITM match probability is at least this (default: 0.5, BLIP#54)")
    p.add_argument("--calibrate", metavar="SHARDS", default=None,
                   help="held-out human-annotated shards (image + .txt, unseen by the filter in training): choose "
                        "the threshold that keeps --keep of them instead of a fixed one; recorded in "
                        "OUTPUT/calibration.json and reused on restart")
    p.add_argument("--keep", type=float, default=0.9,
                   help="with --calibrate: share of the held-out human texts the threshold keeps (default: 0.9)")
    p.add_argument("--calibration-key", default=None, metavar="FIELD",
                   help="with --calibrate: json field (class, image id) whose samples describe each other; the "
                        "mismatched pairs reported as a diagnostic are built across its values")
    p.add_argument("--first-token", choices=["enc", "cls"], default="enc",
                   help="token before the text for ITM: enc (as BLIP trained, default) or cls")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default: 16)")
    p.add_argument("--workers", type=int, default=None,
                   help="image decoding threads per process (default: 4 on a GPU, 0 = inline on CPU)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed; captions depend on (seed, key) only")
    p.add_argument("--manifest-format", choices=["auto", "jsonl", "parquet"], default="auto",
                   help="manifest file format (default: parquet when pyarrow is installed, else jsonl)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="precision (default: fp32); bf16 and fp16 halve the weight memory (README: Speed)")
    p.add_argument("--device", default=None, help="cpu, cuda ... (default: this rank's GPU if any)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(run=run_capfilt_cli)


def run_capfilt_cli(args: argparse.Namespace) -> int:
    from ..capfilt import decide, input_shards, load_or_calibrate, run_capfilt, sampling_settings
    from ..capfilt.calibrate import check_keep
    from ..data.shards import expand_urls
    from ..train.distributed import cleanup, init_distributed

    if args.batch_size < 1 or (args.workers is not None and args.workers < 0):
        raise CliError("--batch-size must be at least 1 and --workers at least 0")
    if args.num_captions < 0:
        raise CliError(f"--num-captions must be 0 (filter web texts only) or more, got {args.num_captions}")
    if args.calibrate is not None and args.threshold is not None:
        raise CliError("give --threshold or --calibrate, not both")
    try:
        input_shards(args.input)
        decide(0.0, 0.5 if args.threshold is None else args.threshold)
        if args.calibrate is not None:
            expand_urls(args.calibrate)
            check_keep(args.keep)
    except (OSError, ValueError) as exc:
        raise CliError(str(exc)) from exc
    # Gloo even on GPUs: the only collective is the final barrier, which needs no tensors.
    info = init_distributed("gloo", timeout=BARRIER_TIMEOUT)
    try:
        device = args.device or str(info.device)
        if device == "cuda" and info.distributed:
            device = f"cuda:{info.local_rank}"
        captioner = _load(args, args.captioner, device) if args.num_captions else None
        same = captioner is not None and args.filter == args.captioner
        filter_blip = captioner if same else _load(args, args.filter, device)
        try:
            if captioner is not None:
                sampling_settings(captioner, prompt=args.prompt, num_captions=args.num_captions, top_p=args.top_p,
                                  top_k=args.top_k, repetition_penalty=args.repetition_penalty,
                                  max_length=args.max_length, min_length=args.min_length)
        except ValueError as exc:
            raise CliError(str(exc)) from exc
        threshold = 0.5 if args.threshold is None else args.threshold
        if args.calibrate is not None:
            try:
                calibration = load_or_calibrate(
                    filter_blip, args.calibrate, args.output, keep=args.keep, positive_key=args.calibration_key,
                    batch_size=args.batch_size, first_token=args.first_token, rank=info.rank)
            except ValueError as exc:
                raise CliError(str(exc)) from exc
            threshold = calibration["threshold"]
            if info.rank == 0:
                _print_calibration(calibration)
        result = run_capfilt(
            captioner, filter_blip, args.input, args.output, num_captions=args.num_captions, top_p=args.top_p,
            top_k=args.top_k, repetition_penalty=args.repetition_penalty, max_length=args.max_length,
            min_length=args.min_length, prompt=args.prompt, threshold=threshold, first_token=args.first_token,
            batch_size=args.batch_size, seed=args.seed, rank=info.rank, world_size=info.world_size,
            workers=args.workers, manifest_format=args.manifest_format, progress=not args.no_progress,
        )
    finally:
        cleanup()
    if info.rank != 0:
        return EXIT_OK
    _print_summary(result)
    return EXIT_PARTIAL if result["unreadable_input_shards"] or result["shards"]["missing"] else EXIT_OK


def _load(args: argparse.Namespace, source: str, device: str):
    return load_blip(argparse.Namespace(model=source, device=device, dtype=args.dtype, image_size=None))


def _print_calibration(c: dict[str, Any]) -> None:
    mismatched = f"{100 * c['mismatched_kept']:.1f}%" if c["mismatched_kept"] is not None else "-"
    print(f"calibrated threshold {c['threshold']:.4f}: keeps {100 * c['clean_kept']:.1f}% of {c['pairs']} held-out "
          f"human pairs, {mismatched} of {c['mismatched_pairs']} mismatched ones", flush=True)


def _print_summary(summary: dict[str, Any]) -> None:
    print(f"summary: {summary['summary_path']}")
    parts = []
    for source in ("web", "synthetic"):
        k = summary["kept"][source]
        share = f"{100 * k['fraction']:.1f}%" if k["fraction"] is not None else "-"
        parts.append(f"{source} {k['kept']}/{k['scored']} ({share})")
    print("kept: " + ", ".join(parts), flush=True)
    if summary["image_errors"]:
        print(f"{summary['image_errors']} samples had no decodable image (written with \"error\" in their json)")
    if summary["shards"]["missing"]:
        print(f"unfinished shards: {len(summary['shards']['missing'])} (rerun the same command)")
