"""Fraction of generated captions that name the right Fashion-MNIST class.

    python scripts/fashion_caption_accuracy.py --model runs/fmnist-tiny \
        --data 'data/fmnist/test-00000.tar' --limit 2000

A caption names a class when it contains that class's noun ("ankle boot",
"t-shirt", "pair of trousers"...); longer nouns are matched first so that
"t-shirt" is not read as "shirt". A caption naming no class counts as wrong.

    python scripts/fashion_caption_accuracy.py --predictions runs/x/evaluate/noisy-captions.json

scores captions already written by `openblip bootstrap`'s evaluation (the class of an image is
the one its reference captions name).
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
from collections import Counter

import torch

import openblip
from openblip.data.builders.fashion_mnist import _NOUNS
from openblip.data.shards import expand_urls, iter_samples
from openblip.images import load_image

PATTERNS = sorted(((n, re.compile(rf"(?<![\w-]){re.escape(n)}(?![\w-])")) for n in _NOUNS), key=lambda p: -len(p[0]))


def named_class(caption: str) -> int | None:
    """Index of the class whose noun the caption contains, or None.

    WordPiece decoding spaces hyphens ("t - shirt"); they are joined first.
    """
    text = re.sub(r"\s*-\s*", "-", caption.lower())
    for noun, pattern in PATTERNS:
        if pattern.search(text):
            return _NOUNS.index(noun)
    return None


def score_predictions(path: str) -> dict:
    """Caption accuracy of a predictions file; the label is the class the references name."""
    rows = json.loads(open(path, encoding="utf-8").read())
    labelled = [(named_class(r["caption"]), named_class(r["references"][0])) for r in rows]
    labelled = [(guess, label) for guess, label in labelled if label is not None]
    correct = sum(guess == label for guess, label in labelled)
    per_class = {}
    for i, name in enumerate(_NOUNS):
        guesses = [guess for guess, label in labelled if label == i]
        per_class[name] = round(sum(g == i for g in guesses) / max(len(guesses), 1), 3)
    return {"images": len(labelled), "accuracy": round(correct / max(len(labelled), 1), 4), "per_class": per_class,
            "no_class_named": round(sum(g is None for g, _ in labelled) / max(len(labelled), 1), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--data")
    ap.add_argument("--predictions", help="a JSON list of {caption, references} instead of --model/--data")
    ap.add_argument("--limit", type=int, default=2000)
    ap.add_argument("--num-beams", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    if args.predictions:
        print(json.dumps(score_predictions(args.predictions), indent=2))
        return
    if not (args.model and args.data):
        ap.error("give --model and --data, or --predictions")
    blip = openblip.load(args.model)
    samples = (s for paths in expand_urls(args.data) for p in paths for s in iter_samples(p))
    samples = list(itertools.islice(samples, args.limit))
    prompt_ids, gen = blip.caption_settings(num_beams=args.num_beams, max_length=20, min_length=5)
    correct, unnamed, confusion, examples = 0, 0, Counter(), []
    for start in range(0, len(samples), args.batch_size):
        chunk = samples[start : start + args.batch_size]
        pixels = torch.stack([blip.transform(load_image(s.get("png") or s.get("jpg"))) for s in chunk])
        for sample, caption in zip(chunk, blip.caption_pixels(pixels, prompt_ids, gen)):
            label, guess = sample["json"]["label"], named_class(caption)
            correct += guess == label
            unnamed += guess is None
            confusion[(label, guess)] += 1
            if len(examples) < 10:
                examples.append({"label": sample["json"]["class_name"], "caption": caption})
    per_class = {name: round(confusion[(i, i)] / max(sum(v for (l, _), v in confusion.items() if l == i), 1), 3)
                 for i, name in enumerate(_NOUNS)}
    result = {"images": len(samples), "accuracy": round(correct / len(samples), 4), "per_class": per_class,
              "no_class_named": round(unnamed / len(samples), 4), "chance": 0.1, "examples": examples}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
