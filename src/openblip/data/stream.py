"""A resumable, deterministic image-text stream over WebDataset shards, for training.

`WebImageTextDataset` yields ready batches (use it with ``batch_size=None``, see
`make_loader`). Everything that decides *which* sample lands *where* is a pure
function of ``(seed, epoch, rank, position)``, never of worker scheduling:

* Each rank reads its own stream: the shard list is shuffled with (seed, epoch, pass)
  and rank r takes shards r, r+R, ...; samples go through a seeded shuffle buffer.
  With several sources, the source of each position is drawn with a seeded RNG in
  proportion to the weights, each source cycling over its shards as needed.
* Positions (0, 1, 2, ... on this rank) are cut into batches of `batch_size` from
  `start`; DataLoader worker w builds batches w, w+W, ...; the DataLoader returns
  them round-robin, i.e. in order, so batches are identical for any num_workers.
  Every worker scans the shard headers and captions of the whole rank stream (cheap)
  but reads and decodes only the images of its own batches.
* The augmentation of the sample at a position uses
  ``random.Random(f"{seed}-{epoch}-{rank}-{position}")``.

Exact resume: a run interrupted after consuming batches up to ``batch["next_position"]``
continues with ``set_epoch(epoch, start=next_position)``; fast-forwarding reads only
tar headers and captions. Positions count samples that have an image member and a
non-empty cleaned caption (those without are filtered while scanning, identically in
every run).

Skips never stop the run; they are counted in each batch's ``"skipped"`` dict
(``shard_error``, ``member_error``, ``no_image``, ``no_caption`` found while scanning,
``bad_image`` found while decoding). Every skip is reported in exactly one batch,
so a training loop sums ``batch["skipped"]`` over batches (and over ranks) to get totals.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import random
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from openblip.images import DEFAULT_MAX_PIXELS, ImageError, load_image
from openblip.text import pre_caption

from .shards import IMAGE_EXTENSIONS, MemberRef, expand_urls, iter_samples, parse_weights

__all__ = ["WebImageTextDataset", "make_loader", "split_captions", "transform_with_rng"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Record:
    """A sample as scanned: everything but the decoded image."""

    key: str
    shard: str
    image: bytes | MemberRef
    captions: tuple[str, ...]
    source: int
    group: str  # the positives group: json[group_key] when set, else the key


def split_captions(sample: dict[str, Any], max_words: int) -> list[str]:
    """Cleaned captions of a shard sample: ``json["captions"]`` if present, else the
    non-empty lines of ``txt``; each passed through `pre_caption`, empties dropped."""
    meta = sample.get("json")
    raw = meta.get("captions") if isinstance(meta, dict) else None
    if not isinstance(raw, list):
        raw = sample.get("txt", "").split("\n")
    captions = (pre_caption(str(text), max_words) for text in raw)
    return [caption for caption in captions if caption]


class _FileCache:
    """A few open shard handles per worker, so lazy reads do not reopen files."""

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self.files: OrderedDict[str, BinaryIO] = OrderedDict()

    def read(self, ref: MemberRef) -> bytes:
        file = self.files.pop(ref.path, None) or open(ref.path, "rb")
        self.files[ref.path] = file
        while len(self.files) > self.size:
            self.files.popitem(last=False)[1].close()
        return ref.read(file)

    def close(self) -> None:
        while self.files:
            self.files.popitem()[1].close()


class WebImageTextDataset(IterableDataset):
    """Batches of (image, caption) from WebDataset shards; deterministic and resumable.

    Args:
        urls: shard specification (see `expand_urls`), e.g. ``"d/train-{00000..00009}.tar"``;
            ``::`` separates sources.
        transform: PIL image -> tensor (3, S, S). If it accepts ``rng=`` it receives the
            per-position ``random.Random``; otherwise it is called with Python's, NumPy's
            and torch's global RNGs temporarily seeded from it.
        batch_size: samples per batch (the DataLoader must use ``batch_size=None``).
        seed, epoch, start: see the module docstring; `set_epoch` changes epoch/start.
        rank, world_size: this process's place among data-parallel ranks.
        max_words: `pre_caption` word limit (30 as in BLIP pre-training).
        shuffle: shuffle shard order and samples (through a buffer of `shuffle_buffer`).
        resampled: draw shards with replacement per rank, forever (open_clip
            ``--dataset-resampled``); needs `samples_per_epoch`.
        samples_per_epoch: positions per rank per epoch. Without it a single source is read
            once; with it every source cycles (reshuffled each pass) and the stream is cut
            there, so all ranks see the same number of batches (needed by DDP).
        weights: per-source sampling weights (``"3::1"`` or a list); needs `samples_per_epoch`
            when there is more than one source.
        drop_last: drop a final batch shorter than `batch_size`.
        fill_bad: replace samples whose image fails to decode by copies of other samples
            of the same batch, so batches keep their size (all-gathers need equal sizes);
            False shrinks the batch instead. A batch whose images all fail is yielded
            with zero samples.
        max_pixels: decompression-bomb limit passed to `load_image`.
        group_key: a field of the sample's json naming its positives group (``image_id``
            when one image is stored as several samples, a class label when captions
            describe a class); samples without the field form a group of their own key.

    Each batch is a dict: ``image`` (B, 3, S, S) float tensor, ``text`` list of str,
    ``key`` list of str, ``group`` list of str (see `group_key`), ``source`` (B,) long tensor,
    ``position`` (first position of the batch), ``next_position`` (position to resume from after
    it), ``skipped`` dict.
    """

    def __init__(
        self,
        urls: Any,
        transform: Callable[..., torch.Tensor],
        *,
        batch_size: int,
        seed: int = 0,
        epoch: int = 0,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
        max_words: int = 30,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        resampled: bool = False,
        samples_per_epoch: int | None = None,
        weights: str | Sequence[float] | None = None,
        drop_last: bool = False,
        fill_bad: bool = True,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        group_key: str | None = None,
    ) -> None:
        super().__init__()
        self.sources = expand_urls(urls)
        self.weights = parse_weights(weights, len(self.sources))
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size}, {rank}, {world_size}")
        if samples_per_epoch is None and (resampled or len(self.sources) > 1):
            raise ValueError("samples_per_epoch is required with resampled=True or several sources")
        if not resampled:
            for paths in self.sources:
                if len(paths) < world_size:
                    raise ValueError(
                        f"{len(paths)} shards ({paths[0]!r}, ...) cannot be split over {world_size} ranks; "
                        "write more shards or use resampled=True"
                    )
        self.transform = transform
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.max_words, self.shuffle, self.shuffle_buffer = max_words, shuffle, shuffle_buffer
        self.resampled, self.samples_per_epoch = resampled, samples_per_epoch
        self.drop_last, self.fill_bad, self.max_pixels = drop_last, fill_bad, max_pixels
        self.epoch, self.start = epoch, start
        self.group_key = group_key

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch and the rank-stream position to start from (before ``iter``).

        DataLoader workers get a copy of the dataset when an iterator is created, so
        call this before iterating and do not use ``persistent_workers=True``.
        """
        self.epoch, self.start = epoch, start

    def num_batches(self) -> int | None:
        """Batches per epoch on this rank from position 0, when `samples_per_epoch` is set."""
        if self.samples_per_epoch is None:
            return None
        full, rest = divmod(self.samples_per_epoch, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    # -- the rank stream (records only, no image decoding) ---------------------------

    def _rng(self, *parts: object) -> random.Random:
        return random.Random("-".join(map(str, (self.seed, self.epoch, *parts))))

    def _shard_order(self, source: int) -> Iterator[str]:
        paths = self.sources[source]
        if self.resampled:
            rng = self._rng("resample", self.rank, source)
            while True:
                yield rng.choice(paths)
        for npass in itertools.count():
            order = list(paths)
            if self.shuffle:
                self._rng("shards", source, npass).shuffle(order)
            yield from order[self.rank :: self.world_size]
            if self.samples_per_epoch is None:
                return

    def _records(self, source: int, stats: Counter) -> Iterator[_Record]:
        empty_shards = 0
        for shard in self._shard_order(source):
            found = False
            for sample in iter_samples(shard, stats=stats, lazy=IMAGE_EXTENSIONS):
                record = self._to_record(sample, source, stats)
                if record is not None:
                    found = True
                    yield record
            # A source whose shards are all unusable would otherwise cycle forever.
            empty_shards = 0 if found else empty_shards + 1
            if empty_shards >= max(len(self.sources[source]), 1) * 2:
                log.error("source %d: no usable sample in %d shards in a row, ending it", source, empty_shards)
                return

    def _to_record(self, sample: dict[str, Any], source: int, stats: Counter) -> _Record | None:
        image = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
        if image is None:
            stats["no_image"] += 1
            return None
        captions = split_captions(sample, self.max_words)
        if not captions:
            stats["no_caption"] += 1
            return None
        key = sample["__key__"]
        meta = sample.get("json")
        group = meta.get(self.group_key) if self.group_key and isinstance(meta, dict) else None
        group = key if group is None else f"{self.group_key}={group}"
        return _Record(key, sample["__shard__"], image, tuple(captions), source, group)

    def _shuffled(self, records: Iterator[_Record], source: int) -> Iterator[_Record]:
        if not self.shuffle or self.shuffle_buffer <= 1:
            yield from records
            return
        rng, buffer = self._rng("buffer", self.rank, source), []
        for record in records:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(record)
                continue
            index = rng.randrange(len(buffer))
            yield buffer[index]
            buffer[index] = record
        rng.shuffle(buffer)
        yield from buffer

    def _stream(self, stats: Counter) -> Iterator[_Record]:
        streams = [self._shuffled(self._records(s, stats), s) for s in range(len(self.sources))]
        if len(streams) == 1:
            mixed: Iterator[_Record] = streams[0]
        else:
            mixed = self._mix(streams)
        if self.samples_per_epoch is not None:
            mixed = itertools.islice(mixed, self.samples_per_epoch)
        return mixed

    def _mix(self, streams: list[Iterator[_Record]]) -> Iterator[_Record]:
        rng, choices = self._rng("mix", self.rank), range(len(streams))
        while True:
            record = next(streams[rng.choices(choices, self.weights)[0]], None)
            if record is None:  # a source ran dry (all its shards unusable)
                return
            yield record

    # -- batches --------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        stats: Counter = Counter()
        records = self._stream(stats)
        # Fast-forward without decoding; skips before `start` were reported by the first run.
        for _ in itertools.islice(records, self.start):
            pass
        upcoming = next(records, None)
        if self.start:
            stats.clear()
        files = _FileCache()
        try:
            for index in itertools.count():
                if upcoming is None:
                    return
                chunk = [upcoming, *itertools.islice(records, self.batch_size - 1)]
                # Looking one sample ahead makes every scan-time skip up to the next sample
                # (or the end of the stream) belong to this batch. Every worker sees the same
                # skips; only the batch's owner reports them.
                upcoming = next(records, None)
                if self.drop_last and len(chunk) < self.batch_size:
                    return
                skipped = Counter(stats)
                stats.clear()
                if index % num_workers == worker:
                    yield self._make_batch(chunk, self.start + index * self.batch_size, skipped, files)
        finally:
            files.close()

    def _make_batch(self, chunk: list[_Record], position: int, skipped: Counter, files: _FileCache) -> dict[str, Any]:
        decoded = [self._decode(record, position + offset, files) for offset, record in enumerate(chunk)]
        good = [i for i, item in enumerate(decoded) if item is not None]
        skipped["bad_image"] += len(chunk) - len(good)
        slots = good
        if self.fill_bad and good:
            # Each failed slot takes the next good sample of the batch, wrapping around.
            slots = [
                i if decoded[i] is not None else next((g for g in good if g > i), good[0]) for i in range(len(chunk))
            ]
        images = [decoded[i][0] for i in slots]
        return {
            "image": torch.stack(images) if images else torch.empty(0),
            "text": [decoded[i][1] for i in slots],
            "key": [chunk[i].key for i in slots],
            "group": [chunk[i].group for i in slots],
            "source": torch.tensor([chunk[i].source for i in slots], dtype=torch.long),
            "position": position,
            "next_position": position + len(chunk),
            "skipped": {kind: count for kind, count in skipped.items() if count},
        }

    def _decode(self, record: _Record, position: int, files: _FileCache) -> tuple[torch.Tensor, str] | None:
        rng = self._rng(self.rank, position)
        caption = record.captions[0] if len(record.captions) == 1 else rng.choice(record.captions)
        try:
            data = files.read(record.image) if isinstance(record.image, MemberRef) else record.image
            image = load_image(data, max_pixels=self.max_pixels)
        except (ImageError, OSError, EOFError) as exc:
            log.warning("%s: skipping sample %s: %s", record.shard, record.key, exc)
            return None
        return transform_with_rng(self.transform, image, rng), caption


def transform_with_rng(transform: Callable[..., torch.Tensor], image: Any, rng: random.Random) -> torch.Tensor:
    """Apply `transform` with all its randomness drawn from `rng`.

    A transform that accepts ``rng=`` (openblip's `TrainTransform`) gets it; any other is
    called with Python's, NumPy's and torch's global RNGs seeded from `rng` and restored
    afterwards, so the caller's streams are not disturbed (with num_workers=0 this runs
    in the training process itself).
    """
    if _accepts_rng(transform):
        return transform(image, rng=rng)
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        seed = rng.getrandbits(32)
        random.seed(seed)
        np.random.seed(seed)
        # The CPU generator only: torch.manual_seed would also (slowly) seed CUDA.
        torch.default_generator.manual_seed(seed)
        return transform(image)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)


def _accepts_rng(transform: Callable[..., Any]) -> bool:
    try:
        parameters = inspect.signature(transform).parameters
    except (TypeError, ValueError):
        return False
    return "rng" in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def make_loader(
    dataset: WebImageTextDataset, *, num_workers: int = 0, pin_memory: bool = False, prefetch_factor: int | None = None
) -> DataLoader:
    """A DataLoader that keeps the dataset's batches and their order (``batch_size=None``,
    in-order delivery, no persistent workers so `set_epoch` reaches the workers)."""
    extra = {"prefetch_factor": prefetch_factor} if num_workers > 0 and prefetch_factor else {}
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        **extra,
    )
