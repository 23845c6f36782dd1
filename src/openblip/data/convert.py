"""Turn BLIP JSON annotation lists and image folders into WebDataset shards.

Training streams shards (deterministic, resumable, split over ranks and
workers); a JSON list ``[{"image", "caption"}]`` (reference K) or a folder of
images with a JSONL/CSV of captions is converted once, with the image files
copied byte for byte and every caption of an image on its own ``.txt`` line.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

from .annotations import ImageTextDataset
from .shards import ShardWriter

__all__ = ["annotations_to_shards", "is_annotation_source"]

DONE = "shards.json"


def is_annotation_source(path: str | os.PathLike) -> bool:
    """A JSON annotation list or a folder with a JSONL/CSV/TSV of captions (not shards)."""
    p = Path(path)
    if p.suffix == ".json" and p.is_file():
        return True
    return p.is_dir() and any(p.glob("*.jsonl")) | any(p.glob("*.csv")) | any(p.glob("*.tsv"))


def annotations_to_shards(source: str | os.PathLike, out_dir: str | os.PathLike, *,
                          image_root: str | os.PathLike | None = None, per_shard: int = 1000,
                          max_words: int = 30) -> str:
    """Write ``out_dir/train-NNNNN.tar`` once and return their brace pattern.

    A finished conversion (``shards.json`` present) is reused. Entries without
    an image file or a caption are skipped and counted in ``shards.json``.
    """
    out = Path(out_dir)
    if (out / DONE).is_file():
        return json.loads((out / DONE).read_text())["pattern"]
    src = Path(source)
    if src.suffix == ".json":
        dataset = ImageTextDataset.from_json(src, image_root or src.parent, None, max_words=max_words)
    else:
        dataset = ImageTextDataset.from_folder(src, None, max_words=max_words)
    out.mkdir(parents=True, exist_ok=True)
    skipped = Counter(dataset.skipped)
    count = 0
    with ShardWriter(str(out / "train-%05d.tar"), maxcount=per_shard) as writer:
        for path, captions, image_id in dataset.items:
            try:
                data = Path(path).read_bytes()
            except OSError:
                skipped["missing_image"] += 1
                continue
            ext = Path(path).suffix.lower().lstrip(".") or "jpg"
            ext = "jpg" if ext == "jpeg" else ext
            writer.write({ext: data, "txt": "\n".join(captions), "json": {"image": str(path), "image_id": image_id}})
            count += 1
        shards = writer.close()
    if not count:
        raise ValueError(f"{source} has no entry with both an image file and a caption ({dict(skipped)})")
    pattern = str(out / f"train-{{00000..{len(shards) - 1:05d}}}.tar")
    (out / DONE).write_text(json.dumps({"source": str(source), "pattern": pattern, "samples": count,
                                        "skipped": dict(skipped)}, indent=2))
    return pattern
