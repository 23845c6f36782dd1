"""CapFilt over WebDataset shards: caption every web image, filter web and synthetic texts.

Shard in, shard out. Each input shard ``NAME.tar`` becomes ``OUTPUT/NAME.tar`` holding every
input sample exactly once, under its input key:

* the image member, byte for byte (same extension), and any other member except txt/json;
* ``.txt``: the kept texts, one per line (web text first, then synthetic; duplicates
  dropped; empty when nothing was kept);
* ``.json``: the input's metadata plus ``web_text`` (the raw input text, or None),
  ``web_itm``, ``web_itc``, ``web_kept`` and ``synthetic``: a list of
  ``{"text", "itm", "itc", "kept"}``; an image that cannot be decoded gets ``"error"``
  instead of scores, no synthetic texts and no kept text.

Texts are cleaned with ``pre_caption(text, 30)`` before scoring, as the retrieval model that
serves as the filter saw them in training, and the cleaned form is what ``.txt`` and the
decisions hold (pre-training cleans captions the same way, so nothing is lost); the raw web
text stays in the JSON. The web text is the ``.txt`` member; a sample without one (or whose
text is empty once cleaned) gets synthetic captions only. With ``num_captions=0`` no
captioner runs (none need be loaded): the filter scores the web texts alone.

Restarts are safe. A finished shard is one whose output tar exists; its decisions and stats
are written before the tar is renamed into place, so the tar's presence implies them.
Unfinished work lives in temporary files (``.NAME.tar.*.tmp``), which a restart deletes
before redoing the shard. Running the same command again after a crash, even SIGKILL,
therefore finishes the missing shards and leaves finished ones untouched. Do not run two
jobs on one output directory at the same time.

Rank ``r`` of ``W`` takes the input shards ``r, r + W, ...`` in sorted order; ranks share
nothing but the final barrier, after which rank 0 writes the manifest and summary.
"""

from __future__ import annotations

import logging
import os
import sys
import tarfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..data.shards import _add_sample, atomic_write, expand_urls, iter_samples
from ..images import ImageError, load_image
from ..text import pre_caption
from ..train.distributed import barrier
from . import manifest as files
from .filter import DEFAULT_THRESHOLD, decide, score_texts
from .sample import (
    DEFAULT_MAX_LENGTH,
    DEFAULT_MIN_LENGTH,
    DEFAULT_REPETITION_PENALTY,
    DEFAULT_TOP_K,
    DEFAULT_TOP_P,
    sample_captions,
    sample_seed,
    sampling_settings,
)

if TYPE_CHECKING:
    from ..api import Blip

__all__ = ["CapfiltSettings", "input_shards", "run_capfilt"]

log = logging.getLogger(__name__)

# Image members looked for, in order (img2dataset writes jpg; open_clip looks at these too).
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
MAX_WORDS = 30  # pre_caption length of BLIP's retrieval and pre-training configs


@dataclass(frozen=True)
class CapfiltSettings:
    """Everything that decides the output; recorded in the summary."""

    num_captions: int = 1
    top_p: float = DEFAULT_TOP_P
    top_k: int = DEFAULT_TOP_K
    repetition_penalty: float = DEFAULT_REPETITION_PENALTY
    max_length: int = DEFAULT_MAX_LENGTH
    min_length: int = DEFAULT_MIN_LENGTH
    prompt: str | None = None
    threshold: float = DEFAULT_THRESHOLD
    first_token: str = "enc"
    seed: int = 0


@dataclass
class _Decoded:
    image_ext: str | None
    cap_pixels: torch.Tensor | None = None  # None without a captioner
    filter_pixels: torch.Tensor | None = None
    error: str | None = None


class _Worker:
    """The models, settings and thread pool shared by every shard of one rank."""

    def __init__(self, captioner: Blip | None, filter_blip: Blip, settings: CapfiltSettings, batch_size: int,
                 workers: int) -> None:
        if settings.num_captions < 0:
            raise ValueError(f"num_captions must be 0 (filter the web texts only) or more, got {settings.num_captions}")
        if settings.num_captions and captioner is None:
            raise ValueError(f"num_captions={settings.num_captions} needs a captioner (0 filters web texts only)")
        self.captioner = captioner if settings.num_captions else None
        self.filter, self.settings, self.batch_size = filter_blip, settings, batch_size
        self.prompt_ids, self.gen = [], None
        if self.captioner is not None:
            self.prompt_ids, self.gen = sampling_settings(
                self.captioner, prompt=settings.prompt, num_captions=settings.num_captions, top_p=settings.top_p,
                top_k=settings.top_k, repetition_penalty=settings.repetition_penalty,
                max_length=settings.max_length, min_length=settings.min_length,
            )
        decide(0.0, settings.threshold)  # validates the threshold before any work
        self.same_pixels = self.captioner is not None and self.captioner.image_size == filter_blip.image_size
        self.pool = ThreadPoolExecutor(workers) if workers > 0 else None

    def decode(self, sample: dict[str, Any]) -> _Decoded:
        """Load and transform a sample's image for both models, or say why it cannot be."""
        ext = image_member(sample)
        if ext is None:
            return _Decoded(None, error="no image member (looked for " + ", ".join(IMAGE_EXTENSIONS) + ")")
        try:
            image = load_image(bytes(sample[ext]))
        except ImageError as exc:
            return _Decoded(ext, error=f"cannot decode .{ext}: {exc.problem}")
        cap = self.captioner.transform(image) if self.captioner is not None else None
        return _Decoded(ext, cap, cap if self.same_pixels else self.filter.transform(image))

    def decoded_batches(self, samples: Iterator[dict[str, Any]]) -> Iterator[tuple[list[dict], list[_Decoded]]]:
        """Batches of samples with their decoded images; the next batch decodes while this one runs."""
        pending: tuple[list[dict], list[Future] | list[_Decoded]] | None = None
        while True:
            batch = [s for _, s in zip(range(self.batch_size), samples)]
            current = (batch, [self.pool.submit(self.decode, s) for s in batch]) if self.pool else None
            if pending is not None:
                yield pending[0], [f.result() if isinstance(f, Future) else f for f in pending[1]]
            if not batch:
                return
            pending = current or (batch, [self.decode(s) for s in batch])

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def image_member(sample: dict[str, Any]) -> str | None:
    """The extension of a sample's image member (the first of IMAGE_EXTENSIONS present), or None."""
    return next((e for e in IMAGE_EXTENSIONS if isinstance(sample.get(e), (bytes, bytearray))), None)


def input_shards(input_urls: str | Sequence[str]) -> list[str]:
    """All input shard paths, sorted, each once; basenames must be unique (they name the outputs)."""
    paths = sorted({os.path.normpath(p) for source in expand_urls(input_urls) for p in source})
    names = Counter(files.shard_name(p) for p in paths)
    clashes = [n for n, c in names.items() if c > 1]
    if clashes:
        raise ValueError(f"input shards must have distinct file names (outputs are named after them): {clashes[:5]}")
    return paths


def run_capfilt(
    captioner: Blip | None,
    filter: Blip,  # noqa: A002 - the name of the BLIP component
    input_urls: str | Sequence[str],
    output_dir: str | os.PathLike,
    *,
    num_captions: int = 1,
    top_p: float = DEFAULT_TOP_P,
    top_k: int = DEFAULT_TOP_K,
    repetition_penalty: float = DEFAULT_REPETITION_PENALTY,
    max_length: int = DEFAULT_MAX_LENGTH,
    min_length: int = DEFAULT_MIN_LENGTH,
    prompt: str | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    first_token: str = "enc",
    batch_size: int = 16,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    workers: int | None = None,
    manifest_format: str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Caption and filter this rank's input shards, then (rank 0) write the manifest and summary.

    Args:
        captioner: the image-grounded decoder (BLIP's COCO captioning model); None (or any
            model, unused) with ``num_captions=0``.
        filter: the image-grounded encoder with ITM (and ITC) heads (BLIP's COCO retrieval model).
        input_urls: shard list (brace patterns, globs, directories, ``::``-separated).
        output_dir: where output shards and bookkeeping files go (see module doc).
        num_captions: synthetic captions per image; 0 filters the web texts only.
        top_p, top_k, repetition_penalty, max_length, min_length, prompt: nucleus sampling as
            BLIP's ``generate(sample=True)`` (lengths count [DEC] and the prompt; ``prompt``
            defaults to the captioner's own, ``"a picture of "`` for captioning checkpoints).
        threshold: keep a text when its ITM match probability is at least this.
        first_token: ``"enc"`` (as BLIP trained ITM) or ``"cls"`` before texts for ITM.
        batch_size: images per forward pass.
        seed: run seed; each image samples from a generator seeded by (seed, key).
        rank, world_size: this process's share of the shards.
        workers: threads decoding images ahead of the models; 0 decodes inline. Default: 4 when
            the captioner is on a GPU, 0 on CPU (where the models already use every core and
            extra threads only compete with them).
        manifest_format: ``"auto"``, ``"jsonl"`` or ``"parquet"``.
        progress: a progress bar per rank on stderr.

    Returns:
        On rank 0 the summary (also in ``summary.json``, whose path is under ``"summary_path"``);
        on other ranks this rank's report (shards processed and skipped, images, seconds).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    settings = CapfiltSettings(num_captions, top_p, top_k, repetition_penalty, max_length, min_length, prompt,
                               threshold, first_token, seed)
    paths = input_shards(input_urls)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if workers is None:
        workers = 4 if filter.device.type == "cuda" else 0
    worker = _Worker(captioner, filter, settings, batch_size, workers)
    try:
        report = _run_rank(worker, paths[rank::world_size], output_dir, rank, progress)
    finally:
        worker.close()
    report["seconds"] = time.perf_counter() - start
    files.write_json(files.rank_path(output_dir, rank), report)
    barrier()  # every rank's shards are finished past this point
    if rank != 0:
        return report
    manifest = files.write_manifest(output_dir, paths, manifest_format)
    record = {**asdict(settings), "batch_size": batch_size, "world_size": world_size,
              "captioner": _source(worker.captioner), "filter": _source(filter)}
    summary = files.write_summary(output_dir, paths, world_size, record, manifest)
    return {**summary, "summary_path": str(output_dir / "summary.json")}


def _source(blip: Blip | None) -> Any:
    return None if blip is None else blip.config.extra.get("source", blip.config.task)


def _run_rank(worker: _Worker, mine: list[str], output_dir: Path, rank: int, progress: bool) -> dict[str, Any]:
    from tqdm import tqdm

    report = {"rank": rank, "shards_processed": 0, "shards_skipped": 0, "images": 0}
    for path in tqdm(mine, desc=f"capfilt rank {rank}", unit="shard", position=rank, disable=not progress,
                     file=sys.stderr, leave=False):
        if files.output_tar_path(output_dir, path).exists():
            report["shards_skipped"] += 1
            continue
        _discard_partial(output_dir, path)
        counts = _process_shard(worker, path, output_dir, rank)
        report["shards_processed"] += 1
        report["images"] += counts["samples"] - counts["image_errors"]
    return report


def _discard_partial(output_dir: Path, input_path: str) -> None:
    """Delete temporary files a killed run left for this shard (atomic_write's ``.NAME.*.tmp``)."""
    for final in (files.output_tar_path, files.decisions_path, files.stats_path):
        name = final(output_dir, input_path).name
        for tmp in output_dir.glob(f".{name}.*.tmp"):
            log.info("removing partial file %s from an interrupted run", tmp)
            tmp.unlink(missing_ok=True)


def _process_shard(worker: _Worker, input_path: str, output_dir: Path, rank: int) -> Counter:
    """Write one output shard, its decisions and stats; the tar is renamed into place last."""
    start = time.perf_counter()
    counts: Counter = Counter()
    read_stats: Counter = Counter()
    decisions: list[dict[str, Any]] = []
    with atomic_write(files.output_tar_path(output_dir, input_path)) as file:
        with tarfile.open(fileobj=file, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for samples, decoded in worker.decoded_batches(iter_samples(input_path, stats=read_stats)):
                for out, records in _process_batch(worker, samples, decoded, counts):
                    _add_sample(tar, out)
                    decisions.extend(records)
        counts["shard_errors"] = read_stats["shard_error"]
        counts["member_errors"] = read_stats["member_error"]
        # Both must exist before the tar does: a present tar is what marks the shard finished.
        files.write_jsonl(files.decisions_path(output_dir, input_path), decisions)
        files.write_json(files.stats_path(output_dir, input_path), {
            "input": input_path, "rank": rank, "seconds": time.perf_counter() - start, "counts": dict(counts),
        })
    if counts["shard_errors"]:
        log.warning("%s: input shard unreadable past some point; its output has the samples before", input_path)
    return counts


def _process_batch(
    worker: _Worker, samples: list[dict[str, Any]], decoded: list[_Decoded], counts: Counter
) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """Caption and score one batch; returns (output sample, decision records) per input sample."""
    ok = [i for i, d in enumerate(decoded) if d.error is None]
    webs = [web_text(s) for s in samples]
    captions: list[list[str]] = []
    scores: list[list[dict[str, Any]]] = []
    if ok:
        pixels = None
        captions = [[] for _ in ok]
        if worker.captioner is not None:
            seeds = [sample_seed(worker.settings.seed, samples[i]["__key__"]) for i in ok]
            pixels = torch.stack([decoded[i].cap_pixels for i in ok])
            captions = sample_captions(worker.captioner, pixels, seeds, worker.prompt_ids, worker.gen)
            captions = [[pre_caption(c, MAX_WORDS) for c in cs] for cs in captions]
        texts = [([webs[i][1]] if webs[i][1] else []) + cs for i, cs in zip(ok, captions)]
        filter_pixels = pixels if worker.same_pixels else torch.stack([decoded[i].filter_pixels for i in ok])
        scores = score_texts(worker.filter, filter_pixels, texts, first_token=worker.settings.first_token)
    results = []
    position = {i: j for j, i in enumerate(ok)}
    for i, sample in enumerate(samples):
        j = position.get(i)
        result = _build(worker, sample, decoded[i], webs[i], captions[j] if j is not None else [],
                        scores[j] if j is not None else [])
        _count(counts, result[0]["json"], decoded[i].error, bool(webs[i][1]))
        results.append(result)
    return results


def web_text(sample: dict[str, Any]) -> tuple[str | None, str]:
    """(raw web text or None, cleaned text: "" when there is nothing to score)."""
    raw = sample.get("txt")
    if not isinstance(raw, str):
        return None, ""
    return raw, pre_caption(raw, MAX_WORDS)


def _build(
    worker: _Worker,
    sample: dict[str, Any],
    decoded: _Decoded,
    web: tuple[str | None, str],
    captions: list[str],
    scores: list[dict[str, Any]],
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The output sample and the decision records of one input sample."""
    key, threshold = sample["__key__"], worker.settings.threshold
    metadata = sample.get("json", {})
    meta = dict(metadata) if isinstance(metadata, dict) else {"metadata": metadata}
    meta.update(web_text=web[0], web_itm=None, web_itc=None, web_kept=False, synthetic=[])
    records: list[dict[str, Any]] = []
    if decoded.error is not None:
        meta["error"] = decoded.error
    else:
        web_scores = scores[:1] if web[1] else []
        for source, text, score in [("web", web[1], s) for s in web_scores] + [
            ("synthetic", c, s) for c, s in zip(captions, scores[len(web_scores):])
        ]:
            kept = decide(score["itm"], threshold)
            records.append({"key": key, "source": source, "text": text, "itm": score["itm"], "itc": score["itc"],
                            "kept": kept})
            if source == "web":
                meta.update(web_itm=score["itm"], web_itc=score["itc"], web_kept=kept)
            else:
                meta["synthetic"].append({"text": text, "itm": score["itm"], "itc": score["itc"], "kept": kept})
    kept_texts = list(dict.fromkeys(r["text"] for r in records if r["kept"]))  # ordered, no duplicates
    out = {k: v for k, v in sample.items() if k not in ("txt", "json", "__shard__")}
    out.update(txt="\n".join(kept_texts), json=meta)
    return out, records


def _count(counts: Counter, meta: dict[str, Any], error: str | None, has_web_text: bool) -> None:
    counts["samples"] += 1
    counts["image_errors"] += error is not None
    counts["no_web_text"] += not has_web_text
    counts["web_scored"] += meta["web_itm"] is not None
    counts["web_kept"] += bool(meta["web_kept"])
    counts["synthetic_scored"] += len(meta["synthetic"])
    counts["synthetic_kept"] += sum(s["kept"] for s in meta["synthetic"])
    counts["samples_with_kept_text"] += bool(meta["web_kept"]) or any(s["kept"] for s in meta["synthetic"])
