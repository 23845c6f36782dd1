"""Controlled caption noise for measuring CapFilt: a clean split, a noisy split, and scoring.

`make_noisy_split` turns a shard set into two (or three) WebDataset shard sets:

* ``human-*.tar``: the first `human_size` usable samples, captions untouched (the
  "human-annotated" pairs of the paper, COCO's role);
* ``web-*.tar``: the next `web_size` samples (default: all the rest), of which exactly
  ``round(fraction * web_size)``, chosen with a seeded RNG, have their caption replaced by
  the caption of another web image of a different class (or, without classes, simply a
  different caption once cleaned) — a controlled version of mismatched alt-text;
* ``calibration-00000.tar`` (with `calibration_size`): the next samples, captions untouched:
  held-out human pairs for choosing the filter's threshold (`openblip.capfilt.calibrate`).

Every output sample keeps its key, image and other members; its ``json`` gains ``subset``
(``"human"``, ``"web"`` or ``"calibration"``), ``noisy`` (True for swapped captions), ``original_caption`` and,
for swapped ones, ``swapped_from`` (the donor's key). CapFilt copies the input metadata into
its output, so these flags travel with the filtered shards.

`capfilt_precision_recall` then scores the filter as a detector of swapped captions: the
positive class is "a swapped web caption", and a removed web caption is a positive prediction.

Both passes are deterministic functions of the input and the seed; shards are written
atomically (`ShardWriter`), and ``split.json`` last, so its presence means the split is complete.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..data.shards import IMAGE_EXTENSIONS, ShardWriter, atomic_write, expand_urls, iter_samples
from ..text import pre_caption

__all__ = [
    "NoiseSettings",
    "capfilt_precision_recall",
    "make_noisy_split",
    "markdown_row",
    "read_capfilt_decisions",
    "read_noise_flags",
]

SPLIT_FILE = "split.json"
MARKDOWN_HEADER = ("| swapped | precision | recall | F1 | web kept | clean kept | swapped kept | synthetic kept |\n"
                   "|---|---|---|---|---|---|---|---|")


@dataclass(frozen=True)
class NoiseSettings:
    """What decides a noisy split; recorded in ``split.json``."""

    human_size: int = 5000
    web_size: int | None = None  # None: every usable sample after the human subset
    fraction: float = 0.3
    seed: int = 0
    class_key: str | None = None  # json field naming the class ("label"); None: compare captions only
    human_shards: int = 2
    web_shards: int = 8
    calibration_size: int = 0  # clean samples after the web set, held out for the filter's threshold

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {self.fraction}")
        if self.human_size < 0 or self.calibration_size < 0 or (self.web_size is not None and self.web_size < 1):
            raise ValueError("human_size and calibration_size must be >= 0 and web_size >= 1")
        if self.human_shards < 1 or self.web_shards < 1:
            raise ValueError("human_shards and web_shards must be at least 1")


@dataclass(frozen=True)
class _Item:
    key: str
    caption: str  # raw text
    group: str  # what must differ between a caption and its replacement


def _caption(sample: dict[str, Any]) -> str:
    text = sample.get("txt")
    return text.strip() if isinstance(text, str) else ""


def _group(sample: dict[str, Any], class_key: str | None) -> str:
    meta = sample.get("json")
    if class_key and isinstance(meta, dict) and class_key in meta:
        return f"class:{meta[class_key]}"
    # No class: two captions are "the same" when they clean to the same text.
    return "text:" + pre_caption(_caption(sample), 30)


def _usable(sample: dict[str, Any]) -> bool:
    has_image = any(ext in sample for ext in IMAGE_EXTENSIONS)
    return has_image and bool(pre_caption(_caption(sample), 30))


def _scan(paths: list[str], settings: NoiseSettings, stats: Counter) -> list[_Item]:
    """Captions and groups of the usable samples, in input order (images are not read)."""
    items: list[_Item] = []
    seen: set[str] = set()
    limit = settings.human_size + settings.web_size + settings.calibration_size if settings.web_size else None
    for path in paths:
        for sample in iter_samples(path, stats=stats, lazy=IMAGE_EXTENSIONS):
            if limit is not None and len(items) >= limit:
                return items
            if not _usable(sample):
                stats["unusable"] += 1
                continue
            if sample["__key__"] in seen:
                raise ValueError(f"{path}: key {sample['__key__']!r} appears twice in the input; keys must be unique")
            seen.add(sample["__key__"])
            items.append(_Item(sample["__key__"], _caption(sample), _group(sample, settings.class_key)))
    return items


def _choose_swaps(web: list[_Item], settings: NoiseSettings) -> dict[int, int]:
    """``{web index: donor web index}`` for exactly ``round(fraction * len(web))`` samples."""
    rng = random.Random(f"{settings.seed}-noisy-split")
    count = round(settings.fraction * len(web))
    donors: dict[int, int] = {}
    for index in sorted(rng.sample(range(len(web)), count)):
        donors[index] = _donor(web, index, rng)
    return donors


def _donor(web: list[_Item], index: int, rng: random.Random) -> int:
    group = web[index].group
    for _ in range(64):  # rejection sampling: cheap unless one group dominates
        j = rng.randrange(len(web))
        if web[j].group != group and _differs(web[j], web[index]):
            return j
    candidates = [j for j, item in enumerate(web) if item.group != group and _differs(item, web[index])]
    if not candidates:
        raise ValueError("every web sample has the same class/caption: no different caption to swap in")
    return rng.choice(candidates)


def _differs(a: _Item, b: _Item) -> bool:
    return pre_caption(a.caption, 30) != pre_caption(b.caption, 30)


def _prepare(output_dir: Path, overwrite: bool) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    existing = [p for name in ("human", "web", "calibration") for p in sorted(output_dir.glob(f"{name}-*.tar"))]
    if existing and not overwrite:
        raise FileExistsError(f"{output_dir} already holds a split ({existing[0].name}, ...); pass overwrite=True")
    for path in [*existing, *output_dir.glob(".*.tmp"), output_dir / SPLIT_FILE]:
        path.unlink(missing_ok=True)


def _annotate(sample: dict[str, Any], subset: str, donor: _Item | None) -> dict[str, Any]:
    meta = sample.get("json", {})
    meta = dict(meta) if isinstance(meta, dict) else {"metadata": meta}
    original = _caption(sample)
    meta.update(subset=subset, noisy=donor is not None, original_caption=original)
    out = {k: v for k, v in sample.items() if k != "__shard__"}
    if donor is not None:
        meta["swapped_from"] = donor.key
        out["txt"] = donor.caption
    out["json"] = meta
    return out


def _write(paths: list[str], output_dir: Path, human: int, web: list[_Item], donors: dict[int, int],
           calibration: int, settings: NoiseSettings) -> tuple[list[str], list[str], list[str]]:
    """Second pass: copy the samples into the human, web and calibration shards, swapping the chosen captions."""
    wanted = human + len(web) + calibration
    per_human = max(1, math.ceil(human / settings.human_shards))
    per_web = max(1, math.ceil(len(web) / settings.web_shards))
    with ShardWriter(str(output_dir / "human-%05d.tar"), maxcount=per_human) as human_writer, \
            ShardWriter(str(output_dir / "web-%05d.tar"), maxcount=per_web) as web_writer, \
            ShardWriter(str(output_dir / "calibration-%05d.tar"), maxcount=max(1, calibration)) as calib_writer:
        position = 0
        for sample in (s for path in paths for s in iter_samples(path)):
            if position >= wanted:
                break
            if not _usable(sample):
                continue
            if position < human:
                human_writer.write(_annotate(sample, "human", None))
            elif position < human + len(web):
                donor = donors.get(position - human)
                web_writer.write(_annotate(sample, "web", web[donor] if donor is not None else None))
            else:
                calib_writer.write(_annotate(sample, "calibration", None))
            position += 1
    return human_writer.paths, web_writer.paths, calib_writer.paths


def make_noisy_split(source: str | os.PathLike, output_dir: str | os.PathLike, settings: NoiseSettings | None = None,
                     *, overwrite: bool = False) -> dict[str, Any]:
    """Write ``human-*.tar``, ``web-*.tar`` and ``split.json`` under `output_dir` (see the module doc).

    Args:
        source: input shards (brace patterns, globs, directories, ``::`` lists), read in order.
        output_dir: where the two shard sets go.
        settings: sizes, noise fraction, seed, class field and shard counts.
        overwrite: replace an earlier split in `output_dir` (otherwise FileExistsError).

    Returns:
        The statistics also written to ``split.json``: sample counts, the exact swapped
        fraction, shard patterns (``human["pattern"]``, ``web["pattern"]``) and settings.

    Raises:
        ValueError: fewer usable samples than `human_size` + 1 (+ `calibration_size`), duplicate
            keys, or no caption of a different class to swap in.
    """
    settings = settings or NoiseSettings()
    start, output_dir = time.time(), Path(output_dir)
    paths = [p for group in expand_urls(source) for p in group]
    stats: Counter = Counter()
    items = _scan(paths, settings, stats)
    human, calibration = settings.human_size, settings.calibration_size
    end = human + settings.web_size if settings.web_size else len(items) - calibration
    web = items[human:end]
    if not web:
        raise ValueError(f"{source}: {len(items)} usable samples, none left for a web set after {human} human ones"
                         + (f" and {calibration} held out for calibration" if calibration else ""))
    if len(items) - end < calibration:
        raise ValueError(f"{source}: {len(items)} usable samples, {len(items) - end} left after the human and web "
                         f"sets for the {calibration} calibration samples")
    donors = _choose_swaps(web, settings)
    _prepare(output_dir, overwrite)
    human_paths, web_paths, calib_paths = _write(paths, output_dir, human, web, donors, calibration, settings)
    result = {
        "source": str(source),
        "settings": asdict(settings),
        "human": {"samples": human, "shards": len(human_paths), "pattern": _pattern(human_paths)},
        "web": {"samples": len(web), "swapped": len(donors), "fraction": len(donors) / len(web),
                "shards": len(web_paths), "pattern": _pattern(web_paths)},
        "calibration": {"samples": calibration, "shards": len(calib_paths),
                        "pattern": _pattern(calib_paths) if calib_paths else None},
        "unused": None if settings.web_size else 0,  # the scan stops once web_size samples are found
        "skipped": dict(stats),
        "seconds": round(time.time() - start, 1),
    }
    with atomic_write(output_dir / SPLIT_FILE) as file:  # last: its presence marks a complete split
        file.write((json.dumps(result, indent=2) + "\n").encode("utf-8"))
    return result


def _pattern(paths: list[str]) -> str:
    """``dir/web-{00000..00007}.tar`` for a run of numbered shards (a single path as is)."""
    if len(paths) <= 1:
        return paths[0] if paths else ""
    first, last = Path(paths[0]), Path(paths[-1])
    prefix, low = first.stem.rsplit("-", 1)
    return str(first.parent / f"{prefix}-{{{low}..{last.stem.rsplit('-', 1)[1]}}}{first.suffix}")


# -- scoring CapFilt against the noise flags ------------------------------------------------


def read_noise_flags(source: str | os.PathLike) -> dict[str, bool]:
    """``{key: noisy}`` from the ``json`` of shards (a noisy split, or CapFilt's output of one)."""
    flags: dict[str, bool] = {}
    for group in expand_urls(source):
        for path in group:
            for sample in iter_samples(path, lazy=IMAGE_EXTENSIONS):
                meta = sample.get("json")
                if isinstance(meta, dict) and "noisy" in meta:
                    flags[sample["__key__"]] = bool(meta["noisy"])
    return flags


def read_capfilt_decisions(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Decision records from a CapFilt ``manifest.jsonl``/``.parquet`` or output directory
    (its manifest, else its ``*.decisions.jsonl`` files)."""
    path = Path(path)
    if path.is_dir():
        for name in ("manifest.jsonl", "manifest.parquet"):
            if (path / name).exists():
                yield from read_capfilt_decisions(path / name)
                return
        for shard_file in sorted(path.glob("*.decisions.jsonl")):
            yield from _jsonl(shard_file)
        return
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        yield from pq.read_table(path).to_pylist()
        return
    yield from _jsonl(path)


def _jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as file:
        for line in file:
            if line.strip():
                yield json.loads(line)


def _ratio(a: int, b: int) -> float | None:
    return a / b if b else None


def capfilt_precision_recall(decisions: Iterable[Mapping[str, Any]], flags: Mapping[str, bool]) -> dict[str, Any]:
    """Precision and recall of "the filter removed a swapped web caption".

    Args:
        decisions: CapFilt records (``key``, ``source`` web|synthetic, ``kept``).
        flags: ``{key: noisy}`` (see `read_noise_flags`); web records of unflagged keys are
            counted under ``"unflagged"`` and left out.

    Returns:
        ``tp fp fn tn``, ``precision recall f1`` (None when undefined), ``swapped``/``clean``
        web texts scored, and kept fractions: ``web``, ``web_clean``, ``web_swapped``, ``synthetic``.
    """
    counts: Counter = Counter()
    for record in decisions:
        kept = bool(record["kept"])
        if record["source"] == "synthetic":
            counts["synthetic"] += 1
            counts["synthetic_kept"] += kept
            continue
        noisy = flags.get(str(record["key"]))
        if noisy is None:
            counts["unflagged"] += 1
            continue
        # Positive class: a swapped caption; a positive prediction: the filter removed the text.
        counts[("tp" if not kept else "fn") if noisy else ("fp" if not kept else "tn")] += 1
    tp, fp, fn, tn = (counts[k] for k in ("tp", "fp", "fn", "tn"))
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    f1 = 2 * precision * recall / (precision + recall) if precision and recall else None
    return {
        "tp": tp, "fp": fp, "fn": fn, "tn": tn,
        "swapped": tp + fn, "clean": fp + tn, "unflagged": counts["unflagged"],
        "precision": precision, "recall": recall, "f1": f1,
        "kept": {
            "web": _ratio(fn + tn, tp + fp + fn + tn),
            "web_clean": _ratio(tn, fp + tn),
            "web_swapped": _ratio(fn, tp + fn),
            "synthetic": _ratio(counts["synthetic_kept"], counts["synthetic"]),
        },
    }


def markdown_row(result: Mapping[str, Any]) -> str:
    """One row under `MARKDOWN_HEADER`: swapped share, P, R, F1 and kept fractions."""
    def num(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}"

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}%"

    scored = result["swapped"] + result["clean"]
    kept = result["kept"]
    cells = [pct(_ratio(result["swapped"], scored)), num(result["precision"]), num(result["recall"]),
             num(result["f1"]), pct(kept["web"]), pct(kept["web_clean"]), pct(kept["web_swapped"]),
             pct(kept["synthetic"])]
    return "| " + " | ".join(cells) + " |"
