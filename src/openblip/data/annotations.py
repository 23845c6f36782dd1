"""Map-style image-text datasets from annotation files, and retrieval evaluation sets.

Training (`ImageTextDataset`), from:

* the original BLIP JSON lists (reference K): ``[{"image": path, "caption": str | [str, ...],
  "image_id": any}]`` with paths relative to an `image_root` (`ImageTextDataset.from_json`);
* a folder of images with a JSONL (``{"image" | "file_name": ..., "caption" | "text": ...}``)
  or CSV/TSV annotation file (columns ``image``/``filepath`` + ``caption``/``text``)
  (`ImageTextDataset.from_folder`).

Items are dicts ``{"image", "text", "index", "key"}`` (``index`` is the dense image id, as
the original remaps ``image_id``), or None when the image cannot be read; `collate_skip_none`
drops those and reports how many in ``batch["skipped"]``. Entries without a usable caption
are dropped at construction and counted in ``dataset.skipped``. A caption list yields one
caption per item, chosen (like the augmentation) by ``random.Random(f"{seed}-{epoch}-{i}")``,
so the data of an index depends only on (seed, epoch, index); `ResumableSampler` gives the
matching deterministic, resumable order.

Evaluation (`RetrievalEvalSet`): per-image caption lists flattened into ``texts`` with
``img2txt`` / ``txt2img`` as in the original retrieval evaluation, from a JSON list
(`load_retrieval_json`) or from shards (`load_retrieval_shards`).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler, default_collate

from openblip.images import DEFAULT_MAX_PIXELS, ImageError, load_image
from openblip.text import pre_caption

from .shards import IMAGE_EXTENSIONS, MemberRef, expand_urls, iter_samples
from .stream import split_captions, transform_with_rng

__all__ = [
    "ImageTextDataset",
    "ResumableSampler",
    "RetrievalEvalSet",
    "collate_skip_none",
    "load_retrieval_json",
    "load_retrieval_shards",
]

log = logging.getLogger(__name__)

_IMAGE_FIELDS = ("image", "file_name", "filepath", "file", "path")
_CAPTION_FIELDS = ("caption", "captions", "text")


def _first(entry: dict[str, Any], names: Sequence[str]) -> Any:
    return next((entry[name] for name in names if entry.get(name) not in (None, "")), None)


def _clean(captions: Any, max_words: int) -> list[str]:
    items = captions if isinstance(captions, (list, tuple)) else [captions]
    cleaned = (pre_caption(str(c), max_words) for c in items if c is not None)
    return [c for c in cleaned if c]


def _resolve(path: str, root: str | os.PathLike | None) -> str:
    return path if root is None or os.path.isabs(path) else os.path.join(root, path)


class ImageTextDataset(Dataset):
    """(image, caption) pairs for training; bad images give None (see `collate_skip_none`).

    Args:
        entries: ``(image_path, captions, image_id)`` triples; `captions` is a list of raw
            captions (one is picked per item).
        transform: PIL image -> tensor; receives ``rng=`` when it accepts it.
        max_words: `pre_caption` word limit.
        seed: seeds the caption choice and augmentation (with the epoch and the index).
        image_root: directory that relative image paths are resolved against.
    """

    def __init__(
        self,
        entries: Sequence[tuple[str, Sequence[str] | str, Any]],
        transform: Callable[..., torch.Tensor],
        *,
        max_words: int = 30,
        seed: int = 0,
        image_root: str | os.PathLike | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.skipped: Counter = Counter()
        self.items: list[tuple[str, tuple[str, ...], int]] = []
        self.image_ids: dict[Any, int] = {}
        for path, captions, image_id in entries:
            cleaned = _clean(captions, max_words)
            if path in (None, ""):
                self.skipped["no_image"] += 1
            elif not cleaned:
                self.skipped["no_caption"] += 1
            else:
                index = self.image_ids.setdefault(path if image_id is None else image_id, len(self.image_ids))
                self.items.append((_resolve(str(path), image_root), tuple(cleaned), index))
        if self.skipped:
            log.warning("skipped annotation entries: %s", dict(self.skipped))
        self.transform, self.seed, self.epoch, self.max_pixels = transform, seed, 0, max_pixels

    @classmethod
    def from_json(
        cls, ann_files: str | os.PathLike | Sequence[str | os.PathLike], image_root: str | os.PathLike, transform, **kw
    ) -> ImageTextDataset:
        """From one or more original BLIP JSON annotation lists (reference K)."""
        files = [ann_files] if isinstance(ann_files, (str, os.PathLike)) else list(ann_files)
        entries = []
        for ann_file in files:
            with open(ann_file, encoding="utf-8") as handle:
                for entry in json.load(handle):
                    entries.append((entry.get("image"), entry.get("caption"), entry.get("image_id")))
        return cls(entries, transform, image_root=image_root, **kw)

    @classmethod
    def from_folder(
        cls, folder: str | os.PathLike, transform, *, annotations: str | os.PathLike | None = None, **kw
    ) -> ImageTextDataset:
        """From a folder of images plus a JSONL or CSV/TSV file (default: the only
        ``*.jsonl`` / ``*.csv`` / ``*.tsv`` in `folder`); relative paths resolve against `folder`."""
        ann = Path(annotations) if annotations is not None else _find_annotations(Path(folder))
        rows = _read_jsonl(ann) if ann.suffix == ".jsonl" else _read_csv(ann)
        entries = [(_first(row, _IMAGE_FIELDS), _first(row, _CAPTION_FIELDS), None) for row in rows]
        return cls(entries, transform, image_root=folder, **kw)

    def set_epoch(self, epoch: int) -> None:
        """Change the epoch that seeds caption choice and augmentation (before iterating)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        path, captions, index = self.items[i]
        rng = random.Random(f"{self.seed}-{self.epoch}-{i}")
        caption = captions[0] if len(captions) == 1 else rng.choice(captions)
        try:
            image = load_image(path, max_pixels=self.max_pixels)
        except ImageError as exc:
            self.skipped["bad_image"] += 1
            log.warning("skipping item %d: %s", i, exc)
            return None
        tensor = transform_with_rng(self.transform, image, rng)
        return {"image": tensor, "text": caption, "index": index, "key": path}


def _find_annotations(folder: Path) -> Path:
    found = sorted(p for ext in ("*.jsonl", "*.csv", "*.tsv") for p in folder.glob(ext))
    if len(found) != 1:
        raise FileNotFoundError(f"{folder}: expected exactly one *.jsonl/*.csv/*.tsv annotation file, found {found}")
    return found[0]


def _read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as exc:
                    log.warning("%s:%d: skipping malformed line (%s)", path, number, exc)
                    yield {}


def _read_csv(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8", newline="") as handle:
        yield from csv.DictReader(handle, delimiter="\t" if path.suffix == ".tsv" else ",")


def collate_skip_none(batch: Sequence[Any], *, fill: bool = False) -> Any:
    """Collate a batch, dropping the None items of failed samples.

    With dict items, the result carries ``"skipped": {"bad_image": n}``. With
    ``fill=True`` (use ``functools.partial``) each None is replaced by the next valid item,
    so the batch keeps its size. Returns None when every item failed.
    """
    kept = [item for item in batch if item is not None]
    if not kept:
        return None
    dropped = len(batch) - len(kept)
    if fill and dropped:
        kept = [
            item if item is not None else next((b for b in batch[i:] if b is not None), kept[0])
            for i, item in enumerate(batch)
        ]
    collated = default_collate(kept)
    if isinstance(collated, dict):
        collated["skipped"] = {"bad_image": dropped} if dropped else {}
    return collated


class ResumableSampler(Sampler[int]):
    """Deterministic per-(seed, epoch) order split over ranks, resumable at any position.

    Like `DistributedSampler` (pads by repeating the start so every rank gets
    ``ceil(n / world_size)`` indices, or drops the tail with `drop_last`), plus
    ``start``: the number of indices this rank already consumed in the epoch.
    """

    def __init__(
        self,
        size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
    ) -> None:
        self.size, self.rank, self.world_size = size, rank, world_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.epoch, self.start = 0, 0
        self.per_rank = size // world_size if drop_last else math.ceil(size / world_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch and how many of this rank's indices to skip."""
        self.epoch, self.start = epoch, start

    def _indices(self) -> list[int]:
        order = list(range(self.size))
        if self.shuffle:
            random.Random(f"{self.seed}-{self.epoch}-sampler").shuffle(order)
        total = self.per_rank * self.world_size
        order = (order * math.ceil(total / max(len(order), 1)))[:total]
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.start :])

    def __len__(self) -> int:
        return max(self.per_rank - self.start, 0)


@dataclass
class RetrievalEvalSet(Dataset):
    """Images with their captions, flattened as the original retrieval evaluation.

    ``texts[t]`` is a caption of image ``txt2img[t]``; ``img2txt[i]`` lists the caption
    indices of image i. Items are ``(image_tensor, i)``. An image that fails to decode
    is replaced by zeros (so indices stay aligned), logged, and counted in `skipped`.
    """

    images: list[str | MemberRef | bytes]
    texts: list[str]
    img2txt: list[list[int]]
    txt2img: list[int]
    transform: Callable[..., torch.Tensor]
    keys: list[str] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)

    def add(self, key: str, image: str | MemberRef | bytes, captions: Sequence[str]) -> None:
        """Append one image and its (already cleaned) captions."""
        index = len(self.images)
        self.images.append(image)
        self.keys.append(key)
        self.img2txt.append(list(range(len(self.texts), len(self.texts) + len(captions))))
        self.texts.extend(captions)
        self.txt2img.extend([index] * len(captions))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        source = self.images[i]
        try:
            image = load_image(source.read() if isinstance(source, MemberRef) else source)
        except (ImageError, OSError, EOFError) as exc:
            self.skipped["bad_image"] += 1
            log.warning("retrieval eval image %d (%s) unreadable, using zeros: %s", i, self.keys[i], exc)
            return torch.zeros_like(self.transform(Image.new("RGB", (32, 32)))), i
        return self.transform(image), i


def load_retrieval_json(
    ann_file: str | os.PathLike, image_root: str | os.PathLike, transform, *, max_words: int = 30
) -> RetrievalEvalSet:
    """From an original eval list ``[{"image": rel_path, "caption": [str, ...]}]`` (reference K).

    Images without any usable caption are dropped (counted in ``skipped["no_caption"]``).
    """
    with open(ann_file, encoding="utf-8") as handle:
        entries = json.load(handle)
    evalset = RetrievalEvalSet([], [], [], [], transform)
    for entry in entries:
        captions = _clean(entry.get("caption"), max_words)
        if not captions or not entry.get("image"):
            evalset.skipped["no_caption" if entry.get("image") else "no_image"] += 1
            continue
        evalset.add(entry["image"], _resolve(entry["image"], image_root), captions)
    return evalset


def load_retrieval_shards(urls: Any, transform, *, max_words: int = 30) -> RetrievalEvalSet:
    """From shards: samples are grouped by key (first image kept, captions merged); the
    captions of a sample are ``json["captions"]`` or the lines of ``txt``."""
    stats: Counter = Counter()
    images: dict[str, Any] = {}
    captions: dict[str, list[str]] = {}
    for paths in expand_urls(urls):
        for path in paths:
            for sample in iter_samples(path, stats=stats, lazy=IMAGE_EXTENSIONS):
                key = sample["__key__"]
                image = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
                if image is not None:
                    images.setdefault(key, image)
                captions.setdefault(key, []).extend(split_captions(sample, max_words))
    evalset = RetrievalEvalSet([], [], [], [], transform)
    evalset.skipped.update(stats)
    for key, texts in captions.items():
        if key not in images or not texts:
            evalset.skipped["no_image" if key not in images else "no_caption"] += 1
            continue
        evalset.add(key, images[key], texts)
    return evalset
