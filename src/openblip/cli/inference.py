"""``openblip caption``, ``openblip match`` and ``openblip vqa``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..images import ImageError, find_images, load_image
from .common import (
    EXIT_OK,
    EXIT_PARTIAL,
    CliError,
    add_model_args,
    add_output_args,
    emit,
    load_blip,
    progress,
    report_failure,
)

CAPTION_MODEL = "Salesforce/blip-image-captioning-base"
MATCH_MODEL = "Salesforce/blip-itm-base-coco"
VQA_MODEL = "Salesforce/blip-vqa-base"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("caption", help="caption images", description="Caption images or folders of images.")
    p.add_argument("images", nargs="+", metavar="IMAGE|DIR", help="image files or folders (searched recursively)")
    add_model_args(p, CAPTION_MODEL)
    p.add_argument("--num-beams", type=int, default=3, help="beam width (default: 3)")
    p.add_argument("--max-length", type=int, default=20, help="max tokens incl. [DEC] and prompt (default: 20)")
    p.add_argument("--min-length", type=int, default=5, help="min tokens incl. [DEC] and prompt (default: 5)")
    p.add_argument("--sample", action="store_true", help="nucleus sampling instead of beam search")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus mass when sampling (default: 0.9)")
    p.add_argument("--top-k", type=int, default=50, help="top-k when sampling, 0 = off (default: 50)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: 1.0)")
    p.add_argument("--repetition-penalty", type=float, default=None,
                   help="default: 1.0 for beam search, 1.1 for sampling (as BLIP)")
    p.add_argument("--length-penalty", type=float, default=1.0, help="beam length penalty (default: 1.0)")
    p.add_argument("--num-captions", type=int, default=1, help="captions per image (default: 1)")
    p.add_argument("--prompt", default=None,
                   help='text the caption starts with, stripped from the output; "" for none '
                        '(default: the prompt the model was trained with, "a picture of " for captioners)')
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--batch-size", type=int, default=8, help="images per batch (default: 8)")
    add_output_args(p)
    p.set_defaults(run=run_caption)

    p = sub.add_parser("match", help="score images against texts (ITM and ITC)",
                       description="Score each image against each text: itm = match probability (ITM head), "
                                   "itc = cosine similarity of the projected features.")
    p.add_argument("image", metavar="IMAGE|DIR", help="an image file or a folder of images")
    p.add_argument("texts", nargs="+", metavar="TEXT")
    add_model_args(p, MATCH_MODEL)
    p.add_argument("--first-token", choices=["enc", "cls"], default=None,
                   help="token before the text for ITM: enc (as BLIP was trained, default) or cls "
                        "(as transformers and the original BLIP_ITM demo)")
    p.add_argument("--batch-size", type=int, default=8, help="images per batch (default: 8)")
    add_output_args(p)
    p.set_defaults(run=run_match)

    p = sub.add_parser("vqa", help="answer a question about images", description="Visual question answering.")
    p.add_argument("image", metavar="IMAGE|DIR", help="an image file or a folder of images")
    p.add_argument("question", metavar="QUESTION")
    add_model_args(p, VQA_MODEL)
    p.add_argument("--answers", type=Path, default=None,
                   help="rank over a candidate list (JSON list, or a text file with one answer a line)")
    p.add_argument("--k", type=int, default=128, help="candidates kept after the first-token pruning (default: 128)")
    p.add_argument("--num-beams", type=int, default=3, help="beam width when generating (default: 3)")
    p.add_argument("--max-length", type=int, default=10, help="max answer tokens incl. [DEC] (default: 10)")
    p.add_argument("--min-length", type=int, default=1, help="min answer tokens incl. [DEC] (default: 1)")
    p.add_argument("--first-token", choices=["enc", "cls"], default=None,
                   help="token before the question: enc (as BLIP was trained, default) or cls (as transformers)")
    p.add_argument("--batch-size", type=int, default=8, help="images per batch (default: 8)")
    add_output_args(p)
    p.set_defaults(run=run_vqa)


def _expand(args: argparse.Namespace, paths: list[str]) -> tuple[list[Path], int]:
    """Image files under the given paths; a missing path is reported and skipped."""
    found, failures = [], 0
    for raw in paths:
        try:
            found.extend(find_images([raw]))
        except (ImageError, FileNotFoundError) as exc:
            failures += 1
            report_failure(args, {"image": raw, "error": str(exc)})
    if not found and not failures:
        raise CliError(f"no images found under {', '.join(paths)}")
    return found, failures


def _load_batch(args: argparse.Namespace, paths: list[Path]) -> tuple[list[Path], list, int]:
    """Decode a batch; an unreadable file is reported and left out, never fatal."""
    good, images, failures = [], [], 0
    for path in paths:
        try:
            images.append(load_image(path))
            good.append(path)
        except ImageError as exc:
            failures += 1
            report_failure(args, {"image": str(path), "error": str(exc)})
    return good, images, failures


def _chunks(items: list, size: int):
    if size < 1:
        raise CliError("--batch-size must be at least 1")
    for i in range(0, len(items), size):
        yield items[i : i + size]


def run_caption(args: argparse.Namespace) -> int:
    paths, failures = _expand(args, args.images)
    blip = load_blip(args)
    try:
        prompt_ids, gen = blip.caption_settings(
            prompt=args.prompt, num_beams=args.num_beams, max_length=args.max_length, min_length=args.min_length,
            sample=args.sample, top_p=args.top_p, top_k=args.top_k, temperature=args.temperature,
            repetition_penalty=args.repetition_penalty, length_penalty=args.length_penalty,
            num_captions=args.num_captions,
        )
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    done = 0  # images captioned so far: image i samples from its own stream, seeded with seed + i
    with progress(args, len(paths), "caption") as bar:
        for chunk in _chunks(paths, args.batch_size):
            good, images, failed = _load_batch(args, chunk)
            failures += failed
            if images:
                pixels = torch.stack([blip.transform(im) for im in images]).to(blip.device, blip.dtype)
                generators = None if args.seed is None else [
                    torch.Generator().manual_seed(args.seed + done + i) for i in range(len(images))]
                captions = blip.caption_pixels(pixels, prompt_ids, gen, generators)
                done += len(images)
                n = gen.num_return_sequences
                for i, path in enumerate(good):
                    mine = captions[i * n : (i + 1) * n]
                    value = mine[0] if n == 1 else mine
                    emit(args, {"image": str(path), "caption": value}, f"{path}\t" + "\t".join(mine))
            bar.update(len(chunk))
    return EXIT_PARTIAL if failures else EXIT_OK


def run_match(args: argparse.Namespace) -> int:
    paths, failures = _expand(args, [args.image])
    blip = load_blip(args)
    with progress(args, len(paths), "match") as bar:
        for chunk in _chunks(paths, args.batch_size):
            good, images, failed = _load_batch(args, chunk)
            failures += failed
            if images:
                scores = blip.match(images, args.texts, first_token=args.first_token)
                for i, path in enumerate(good):
                    for j, text in enumerate(args.texts):
                        itm, itc = float(scores.itm[i, j]), float(scores.itc[i, j])
                        rec = {"image": str(path), "text": text, "itm": round(itm, 6), "itc": round(itc, 6)}
                        emit(args, rec, f"{path}\t{text}\titm={itm:.4f}\titc={itc:.4f}")
            bar.update(len(chunk))
    return EXIT_PARTIAL if failures else EXIT_OK


def read_answer_list(path: Path) -> list[str]:
    """Candidate answers from a JSON list or a text file (one a line)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CliError(f"cannot read answer list {path}: {exc}") from exc
    if path.suffix == ".json":
        try:
            answers = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CliError(f"answer list {path} is not valid JSON: {exc}") from exc
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise CliError(f"answer list {path} must be a JSON list of strings")
    else:
        answers = [line.strip() for line in text.splitlines() if line.strip()]
    if not answers:
        raise CliError(f"answer list {path} is empty")
    return answers


def run_vqa(args: argparse.Namespace) -> int:
    answers = read_answer_list(args.answers) if args.answers else None
    paths, failures = _expand(args, [args.image])
    blip = load_blip(args)
    with progress(args, len(paths), "vqa") as bar:
        for chunk in _chunks(paths, args.batch_size):
            good, images, failed = _load_batch(args, chunk)
            failures += failed
            if images:
                try:
                    out = blip.answer(images, args.question, answers=answers, k=args.k, num_beams=args.num_beams,
                                      max_length=args.max_length, min_length=args.min_length,
                                      first_token=args.first_token)
                except ValueError as exc:
                    raise CliError(str(exc)) from exc
                out = out if isinstance(out, list) else [out]
                for path, answer in zip(good, out):
                    rec = {"image": str(path), "question": args.question, "answer": answer}
                    emit(args, rec, f"{path}\t{args.question}\t{answer}")
            bar.update(len(chunk))
    return EXIT_PARTIAL if failures else EXIT_OK
