"""Tiny image-text shards built on the fly: coloured shapes with matching captions."""

from __future__ import annotations

import io
import random
from pathlib import Path

from PIL import Image, ImageDraw

from openblip.data.shards import write_shard

COLORS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "yellow": (230, 230, 20)}
SHAPES = ("square", "circle")


def shape_image(color: str, shape: str, size: int = 48) -> Image.Image:
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    box = [size // 6, size // 6, size - size // 6, size - size // 6]
    (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=COLORS[color])
    return image


def make_shards(folder: Path, n_shards: int = 4, per_shard: int = 16, seed: int = 0,
                caption_words: int | None = None) -> str:
    """Write ``train-0000{i}.tar`` shards; returns the brace pattern. With
    ``caption_words``, every caption has exactly that many words (equal token counts)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        samples = []
        for i in range(per_shard):
            color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
            buf = io.BytesIO()
            shape_image(color, shape).save(buf, "PNG")
            text = f"a {color} {shape}"
            if caption_words:
                text = " ".join((text.split() * caption_words)[:caption_words])
            samples.append({"__key__": f"{s:05d}{i:04d}", "png": buf.getvalue(), "txt": text,
                            "json": {"color": color, "shape": shape}})
        write_shard(folder / f"train-{s:05d}.tar", samples)
    return str(folder / f"train-{{00000..{n_shards - 1:05d}}}.tar")
