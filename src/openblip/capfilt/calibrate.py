"""The filter's threshold, chosen on held-out human-annotated pairs.

BLIP keeps a text whose ITM match probability is at least 0.5 (BLIP#54). That number suits the
filter BLIP used, a ViT-B fine-tuned on COCO, whose correct captions score near 1. A filter
fine-tuned on other data can sit elsewhere: a small model on look-alike classes gives correct
captions of those classes ~0.3-0.4, because in training the same caption was a hard negative
of the look-alike images as often as it was a positive (docs/capfilt.md). This is a deliberate
addition to BLIP, off by default.

:func:`calibrate_threshold` scores held-out human pairs, clean by construction and unseen by
the filter in training, and returns the threshold that keeps a chosen share of them (``keep``,
default 0.9: "drop at most ~10% of texts as good as the human ones"). It needs no noise labels
and no guess of the noise rate. As a diagnostic it also scores every image against another
held-out image's caption (one of another ``positive_key`` group, when given, and never the
same text) and reports the share of those mismatches the threshold would keep: an estimate of
how much random-swap noise gets through.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..data.shards import expand_urls, iter_samples
from ..images import ImageError, load_image
from ..train.distributed import barrier
from .filter import score_texts
from .manifest import write_json
from .run import IMAGE_EXTENSIONS, image_member, web_text

if TYPE_CHECKING:
    from ..api import Blip

__all__ = ["CALIBRATION_FILE", "calibrate_threshold", "check_keep", "load_or_calibrate", "threshold_for_keep"]

CALIBRATION_FILE = "calibration.json"


def check_keep(keep: float) -> None:
    """Raise ValueError unless ``keep`` is a share in (0, 1]."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep is the share of held-out human texts to keep, in (0, 1]; got {keep}")


def threshold_for_keep(scores: Sequence[float], keep: float) -> float:
    """The largest threshold that keeps at least ``keep`` of ``scores`` (kept: score >= threshold)."""
    check_keep(keep)
    if not scores:
        raise ValueError("no held-out pairs to calibrate on")
    ordered = sorted(scores, reverse=True)
    return float(ordered[math.ceil(keep * len(ordered)) - 1])


def calibrate_threshold(
    filter_blip: Blip,
    shards: str | Sequence[str],
    *,
    keep: float = 0.9,
    positive_key: str | None = None,
    limit: int | None = None,
    batch_size: int = 32,
    first_token: str = "enc",
) -> dict[str, Any]:
    """Choose the ITM threshold that keeps ``keep`` of the held-out human pairs in ``shards``.

    Args:
        filter_blip: the filter (image-grounded encoder with the ITM head).
        shards: held-out human-annotated WebDataset shards (image + ``.txt``), not used to
            fine-tune the filter.
        keep: share of those pairs the threshold keeps.
        positive_key: a json field (e.g. a class or image id); mismatched pairs are built only
            between samples whose values differ, since texts of one group describe each other's
            images.
        limit: use the first ``limit`` usable samples.
        batch_size: images per forward pass.
        first_token: as :func:`openblip.capfilt.score_texts`.

    Returns:
        ``{"threshold", "keep", "pairs", "clean_kept", "mismatched_pairs", "mismatched_kept",
        "clean_itm_quantiles", "skipped", "positive_key"}``.

    Raises:
        ValueError: ``keep`` outside (0, 1], or no usable pair in ``shards``.
    """
    check_keep(keep)
    paths = [p for source in expand_urls(shards) for p in source]
    skipped: Counter = Counter()
    items = _texts(paths, positive_key, limit, skipped)
    if not items:
        raise ValueError(f"no usable held-out pair (image and text) in {paths[:3]}; skipped: {dict(skipped)}")
    partner = _mismatch_partners(items)
    clean: list[float] = []
    mismatched: list[float] = []
    index = {k: i for i, (k, _, _) in enumerate(items)}
    for keys, pixels in _image_batches(filter_blip, paths, set(index), batch_size, skipped):
        texts = []
        for key in keys:
            i = index[key]
            texts.append([items[i][1]] + ([items[partner[i]][1]] if partner[i] is not None else []))
        for scores in score_texts(filter_blip, pixels, texts, first_token=first_token):
            clean.append(scores[0]["itm"])
            mismatched.extend(s["itm"] for s in scores[1:])
    if not clean:
        raise ValueError(f"no held-out image could be decoded in {paths[:3]}; skipped: {dict(skipped)}")
    threshold = threshold_for_keep(clean, keep)
    ordered = sorted(clean)
    return {
        "threshold": threshold,
        "keep": keep,
        "pairs": len(clean),
        "clean_kept": sum(s >= threshold for s in clean) / len(clean),
        "mismatched_pairs": len(mismatched),
        "mismatched_kept": (sum(s >= threshold for s in mismatched) / len(mismatched)) if mismatched else None,
        "clean_itm_quantiles": {str(q): ordered[min(int(q * len(ordered)), len(ordered) - 1)]
                                for q in (0.05, 0.1, 0.25, 0.5)},
        "skipped": dict(skipped),
        "positive_key": positive_key,
        "shards": paths,
    }


def _texts(paths: list[str], positive_key: str | None, limit: int | None, skipped: Counter) -> list[tuple]:
    """(key, cleaned text, group) of the usable samples, in shard order (images not decoded)."""
    items: list[tuple[str, str, Any]] = []
    for path in paths:
        for sample in iter_samples(path, lazy=IMAGE_EXTENSIONS):
            text = web_text(sample)[1]  # cleaned as CapFilt cleans the texts it scores
            if not text:
                skipped["no_text"] += 1
                continue
            meta = sample.get("json") if isinstance(sample.get("json"), dict) else {}
            items.append((sample["__key__"], text, meta.get(positive_key) if positive_key else None))
            if limit is not None and len(items) >= limit:
                return items
    return items


def _mismatch_partners(items: list[tuple]) -> list[int | None]:
    """For sample i, the next sample (cyclically) of another group with another text, or None."""
    n = len(items)
    partners: list[int | None] = []
    for i, (_, text, group) in enumerate(items):
        found = None
        for step in range(1, n):
            j = (i + step) % n
            if items[j][1] != text and (group is None or items[j][2] != group):
                found = j
                break
        partners.append(found)
    return partners


def _image_batches(filter_blip: Blip, paths: list[str], wanted: set[str], batch_size: int,
                   skipped: Counter) -> Iterator[tuple[list[str], torch.Tensor]]:
    keys: list[str] = []
    pixels: list[torch.Tensor] = []
    for path in paths:
        for sample in iter_samples(path):
            key = sample["__key__"]
            if key not in wanted:
                continue
            wanted.discard(key)  # a key repeated in another shard is scored once
            ext = image_member(sample)
            try:
                if ext is None:
                    raise ImageError(key, "no image member")
                image = load_image(bytes(sample[ext]))
            except ImageError:
                skipped["bad_image"] += 1
                continue
            keys.append(key)
            pixels.append(filter_blip.transform(image))
            if len(keys) == batch_size:
                yield keys, torch.stack(pixels)
                keys, pixels = [], []
    if keys:
        yield keys, torch.stack(pixels)


def load_or_calibrate(
    filter_blip: Blip,
    shards: str | Sequence[str],
    output_dir: str | os.PathLike,
    *,
    keep: float = 0.9,
    positive_key: str | None = None,
    limit: int | None = None,
    batch_size: int = 32,
    first_token: str = "enc",
    rank: int = 0,
) -> dict[str, Any]:
    """:func:`calibrate_threshold`, recorded once in ``OUTPUT/calibration.json`` for a CapFilt run.

    A restarted run reads the recorded threshold back instead of recomputing it, so every output
    shard is decided by the same number. Rank 0 calibrates and writes the file; the other ranks
    wait and read it.

    Raises:
        ValueError: the file exists but was made for other shards or settings (the output
            already holds decisions taken with its threshold).
    """
    path = Path(output_dir) / CALIBRATION_FILE
    request = {"shards": [p for source in expand_urls(shards) for p in source], "keep": keep,
               "positive_key": positive_key, "limit": limit, "first_token": first_token}
    if rank == 0 and not path.is_file():
        result = calibrate_threshold(filter_blip, shards, keep=keep, positive_key=positive_key, limit=limit,
                                     batch_size=batch_size, first_token=first_token)
        write_json(path, {"request": request, **result})
    barrier()
    recorded = json.loads(path.read_text(encoding="utf-8"))
    if recorded.get("request") != request:
        changed = sorted(k for k in request if recorded.get("request", {}).get(k) != request[k])
        raise ValueError(f"{path} was made with other calibration settings ({', '.join(changed)} differ) and "
                         f"{Path(output_dir)} holds decisions taken with its threshold; use a new output "
                         f"directory (or delete it to start over)")
    return recorded
