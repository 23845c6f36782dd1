"""Open Clip Art Library (Debian ``openclipart-png`` + ``openclipart-svg``) as shards.

Each PNG under ``<root>/png`` is paired with the SVG of the same relative path under
``<root>/svg``. The caption is the work's title (``cc:Work/dc:title``, else the SVG
``<title>``) followed by its description (``dc:description``) when that adds something.
Text is kept as the artists wrote it, other languages, "Part of the Flat Icon
Collection" and all: real alt-text is that noisy, which is why this set is useful next
to clean captions; only whitespace runs are collapsed (a newline would read as a second
caption). Transparency is flattened on white, large images are downscaled to `max_side`
and everything is stored as JPEG (quality 90: a third smaller than PNG for these
images). The few giant PNGs (over `MAX_SOURCE_PIXELS`) are skipped and counted. Symlinks in the package duplicate files under a
second category and are ignored. The split is ``sha1(relative name)``: stable whatever
the seed, limit or package version; the seed only shuffles the training order.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import random
import re
import time
import warnings
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from openblip.images import ImageError, load_image

from ..shards import ShardWriter
from .common import MissingPackageError, prepare_output, shard_pattern, shard_size, write_stats

__all__ = ["MAX_SOURCE_PIXELS", "PACKAGES", "ROOT", "build", "find_pairs", "make_caption", "read_svg_text"]

PACKAGES = ("openclipart-png", "openclipart-svg")
ROOT = Path("/usr/share/openclipart")
MAX_SVG_BYTES = 16 * 1024 * 1024  # the largest packaged SVG is 1.7 MB
# A handful of packaged PNGs are 10k x 16k pixels or more (up to 623 Mpx): decoding one
# takes gigabytes and many seconds, so they are skipped and counted as too large.
MAX_SOURCE_PIXELS = 32_000_000

_DC = "{http://purl.org/dc/elements/1.1/}"
_SVG = "{http://www.w3.org/2000/svg}"
_WHITESPACE = re.compile(r"\s+")


def find_pairs(root: Path, stats: Counter) -> list[tuple[str, Path, Path]]:
    """``(relative name without extension, png, svg)`` for every real PNG with an SVG, sorted."""
    png_root, svg_root = os.path.join(root, "png"), os.path.join(root, "svg")
    pairs = []
    for directory, _, files in os.walk(png_root):
        for file in files:
            png = os.path.join(directory, file)
            stem, ext = os.path.splitext(file)
            if ext.lower() != ".png" or os.path.islink(png):
                continue
            name = os.path.relpath(os.path.join(directory, stem), png_root).replace(os.sep, "/")
            svg = os.path.join(svg_root, f"{name}.svg")
            if os.path.isfile(svg):
                pairs.append((name, Path(png), Path(svg)))
            else:
                stats["no_svg"] += 1
    return sorted(pairs)


def read_svg_text(path: Path, max_bytes: int = MAX_SVG_BYTES) -> tuple[str, str]:
    """``(title, description)`` from an SVG's metadata ("" when absent).

    Parsing stops at the end of ``<metadata>`` so large drawings are not parsed.
    Raises ValueError for files over `max_bytes` and for malformed XML.
    """
    if path.stat().st_size > max_bytes:
        raise ValueError(f"{path}: larger than {max_bytes} bytes")
    found = {"work_title": "", "description": "", "svg_title": ""}
    parents: list[str] = []
    try:
        for event, element in ET.iterparse(path, events=("start", "end")):
            if event == "start":
                parents.append(element.tag)
                continue
            parents.pop()
            parent = parents[-1] if parents else ""
            _note_text(found, element, parent, depth=len(parents))
            if element.tag.endswith("}metadata"):
                break
    except ET.ParseError as exc:
        raise ValueError(f"{path}: malformed XML ({exc})") from exc
    return found["work_title"] or found["svg_title"], found["description"]


def _note_text(found: dict[str, str], element: ET.Element, parent: str, depth: int) -> None:
    # dc:title also names creators/publishers (inside cc:Agent); only the Work's title counts.
    if element.tag == f"{_DC}title" and parent.endswith("}Work"):
        slot = "work_title"
    elif element.tag == f"{_DC}description" and parent.endswith("}Work"):
        slot = "description"
    elif element.tag == f"{_SVG}title" and depth == 1:
        slot = "svg_title"
    else:
        return
    if not found[slot]:
        found[slot] = _WHITESPACE.sub(" ", "".join(element.itertext())).strip()


def make_caption(title: str, description: str) -> str:
    """Title, then the description unless it repeats the title; "" without a title."""
    title, description = title.strip(), description.strip()
    if not title:
        return ""
    if not description or description.lower() in title.lower():
        return title
    return f"{title} {description}" if title[-1] in ".!?:;" else f"{title}. {description}"


def _pixels(path: Path) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as image:  # reads the header only
                return image.width * image.height
        except Image.DecompressionBombError:  # over twice Pillow's own limit
            return math.inf


def _prepare_image(path: Path, max_side: int, quality: int) -> tuple[bytes, dict[str, int]]:
    image = load_image(path, max_pixels=MAX_SOURCE_PIXELS)  # composites transparency onto white
    size = {"original_width": image.width, "original_height": image.height}
    if max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue(), {**size, "width": image.width, "height": image.height}


def _is_test(name: str, fraction: float) -> bool:
    return int(hashlib.sha1(name.encode("utf-8")).hexdigest()[:8], 16) < fraction * 2**32


def _captioned(pairs: list[tuple[str, Path, Path]], stats: Counter) -> Iterator[tuple[str, Path, str, str, str]]:
    for name, png, svg in pairs:
        if svg.stat().st_size > MAX_SVG_BYTES:
            stats["svg_too_large"] += 1
            continue
        try:
            title, description = read_svg_text(svg)
        except (ValueError, OSError):
            stats["svg_malformed"] += 1
            continue
        caption = make_caption(title, description)
        if not caption:
            stats["no_title"] += 1
            continue
        yield name, png, caption, title, description


def _write(writer: ShardWriter, items: list[tuple], max_side: int, quality: int, stats: Counter) -> int:
    written = 0
    for name, png, caption, title, description in items:
        try:
            if _pixels(png) > MAX_SOURCE_PIXELS:
                stats["image_too_large"] += 1
                continue
            data, size = _prepare_image(png, max_side, quality)
        except (ImageError, OSError):
            stats["bad_image"] += 1
            continue
        meta = {
            "source": "openclipart",
            "name": name,
            "category": name.split("/")[0],
            "title": title,
            "description": description,
            "caption": caption,
            **size,
        }
        writer.write({"jpg": data, "txt": caption, "json": meta})
        written += 1
    return written


def build(
    out: str | Path,
    *,
    train_shards: int = 4,
    test_fraction: float = 0.05,
    max_side: int = 384,
    quality: int = 90,
    seed: int = 0,
    limit: int | None = None,
    root: str | Path | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write ``train-{00000..}.tar``, ``test-00000.tar`` and ``stats.json`` under `out`.

    `limit` keeps the first `limit` pairs in name order (for smoke tests). Returns the stats.

    Raises:
        MissingPackageError: the PNG or SVG tree is missing under `root`.
    """
    started, out, stats = time.time(), Path(out), Counter()
    root = Path(root) if root is not None else ROOT
    if not (root / "png").is_dir() or not (root / "svg").is_dir():
        raise MissingPackageError(PACKAGES, root)
    pairs = find_pairs(root, stats)
    if not pairs:
        raise MissingPackageError(PACKAGES, root)
    pairs = pairs[:limit] if limit is not None else pairs
    prepare_output(out, overwrite)
    items = list(_captioned(pairs, stats))
    test = [item for item in items if _is_test(item[0], test_fraction)]
    train = [item for item in items if not _is_test(item[0], test_fraction)]
    random.Random(f"openclipart-{seed}").shuffle(train)  # shards should not be category-sorted
    with ShardWriter(str(out / "train-%05d.tar"), maxcount=shard_size(len(train), train_shards)) as writer:
        n_train = _write(writer, train, max_side, quality, stats)
    train_paths = writer.paths
    with ShardWriter(str(out / "test-%05d.tar"), maxcount=max(len(test), 1)) as writer:
        n_test = _write(writer, test, max_side, quality, stats)
    result = {
        "dataset": "openclipart",
        "package": " ".join(PACKAGES),
        "source_dir": str(root),
        "seed": seed,
        "pairs": len(pairs),
        "train": {"samples": n_train, "shards": len(train_paths), "pattern": shard_pattern(train_paths)},
        "test": {"samples": n_test, "shards": len(writer.paths), "pattern": shard_pattern(writer.paths)},
        "skipped": dict(sorted(stats.items())),
        "seconds": round(time.time() - started, 1),
    }
    write_stats(out / "stats.json", result)
    return result
