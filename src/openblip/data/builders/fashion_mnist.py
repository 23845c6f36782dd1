"""Fashion-MNIST (Debian ``dataset-fashion-mnist``) as captioned WebDataset shards.

70,000 grayscale 28x28 product photos of 10 classes (60,000 train, 10,000 test, the
official split). Images are stored as lossless 28x28 PNG (about 300 bytes each):
upscaling here would only bloat the shards, since the transforms resize to the model's
input size anyway (bicubic, as for any small image). Each caption is a phrasing of the
class name drawn from `TEMPLATES` with ``random.Random(f"{seed}-{split}-{index}")``, so
a sample's caption does not depend on ``--limit`` or the shard count. The ``json``
member holds ``label``, ``class_name``, ``source``, ``split`` and ``index`` (position in
the official split).
"""

from __future__ import annotations

import gzip
import random
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..shards import ShardWriter
from .common import MissingPackageError, prepare_output, shard_pattern, shard_size, write_stats

__all__ = ["CLASS_NAMES", "DATA_DIR", "PACKAGE", "TEMPLATES", "build", "caption_for", "load_split"]

PACKAGE = "dataset-fashion-mnist"
DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# How the classes read inside a sentence (a "trouser" is a pair of trousers).
_NOUNS = ("t-shirt", "pair of trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
TEMPLATES = (
    "a photo of {}",
    "a black and white picture of {}",
    "a product photo of {}",
    "a grayscale photo of {}",
    "a low resolution photo of {}",
    "a small picture of {}",
    "{} on a black background",
    "a catalogue image of {}",
    "a close-up photo of {}",
    "a picture of {}",
)


def caption_for(label: int, rng: random.Random) -> str:
    """A caption for class `label`, e.g. "a product photo of an ankle boot"."""
    noun = _NOUNS[label]
    article = "an" if noun[0] in "aeiou" else "a"
    return rng.choice(TEMPLATES).format(f"{article} {noun}")


def _read_idx(path: Path, count: int | None = None) -> np.ndarray:
    """Read (the first `count` items of) a gzipped IDX file: the MNIST format of a
    big-endian header (magic, dimensions) followed by uint8 data."""
    with gzip.open(path, "rb") as file:
        zero, dtype, ndim = struct.unpack(">HBB", file.read(4))
        if zero != 0 or dtype != 0x08:
            raise ValueError(f"{path}: not an unsigned-byte IDX file")
        shape = struct.unpack(f">{ndim}I", file.read(4 * ndim))
        shape = (shape[0] if count is None else min(count, shape[0]), *shape[1:])
        data = np.frombuffer(file.read(int(np.prod(shape))), dtype=np.uint8)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: {data.size} values for shape {shape} (truncated?)")
    return data.reshape(shape)


def load_split(split: str, root: Path = DATA_DIR, count: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) of the "train" or "test" split
    (the first `count` only, when given).

    Raises:
        MissingPackageError: the IDX files are not under `root`.
    """
    paths = [Path(root) / name for name in _FILES[split]]
    if not all(path.is_file() for path in paths):
        raise MissingPackageError([PACKAGE], root)
    images, labels = _read_idx(paths[0], count), _read_idx(paths[1], count)
    if len(images) != len(labels):
        raise ValueError(f"{root}: {len(images)} images but {len(labels)} labels in the {split} split")
    return images, labels


def _samples(split: str, images: np.ndarray, labels: np.ndarray, seed: int) -> Iterator[dict[str, Any]]:
    for index, (pixels, label) in enumerate(zip(images, labels)):
        label = int(label)
        rng = random.Random(f"{seed}-{split}-{index}")
        yield {
            "png": Image.fromarray(np.ascontiguousarray(pixels)),  # uint8 2-D -> mode "L"
            "txt": caption_for(label, rng),
            "json": {
                "label": label,
                "class_name": CLASS_NAMES[label],
                "source": "fashion-mnist",
                "split": split,
                "index": index,
                "width": int(pixels.shape[1]),
                "height": int(pixels.shape[0]),
            },
        }


def build(
    out: str | Path,
    *,
    train_shards: int = 6,
    test_size: int | None = None,
    seed: int = 0,
    limit: int | None = None,
    root: str | Path | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write ``train-{00000..}.tar`` (official train split, `train_shards` shards),
    ``test-00000.tar`` (the first `test_size` test images) and ``stats.json`` under `out`.

    `limit` keeps the first `limit` samples of each split (for smoke tests). Returns the stats.
    """
    started, out = time.time(), Path(out)
    root = Path(root) if root is not None else DATA_DIR
    test_caps = [count for count in (test_size, limit) if count is not None]
    train = load_split("train", root, limit)
    test = load_split("test", root, min(test_caps) if test_caps else None)
    prepare_output(out, overwrite)
    n_train, n_test = len(train[1]), len(test[1])
    with ShardWriter(str(out / "train-%05d.tar"), maxcount=shard_size(n_train, train_shards)) as writer:
        for sample in _samples("train", *train, seed):
            writer.write(sample)
    train_paths = writer.paths
    with ShardWriter(str(out / "test-%05d.tar"), maxcount=max(n_test, 1)) as writer:
        for sample in _samples("test", *test, seed):
            writer.write(sample)
    stats = {
        "dataset": "fashion-mnist",
        "package": PACKAGE,
        "source_dir": str(root),
        "seed": seed,
        "train": {"samples": n_train, "shards": len(train_paths), "pattern": shard_pattern(train_paths)},
        "test": {"samples": n_test, "shards": len(writer.paths), "pattern": shard_pattern(writer.paths)},
        "classes": list(CLASS_NAMES),
        "skipped": {},
        "seconds": round(time.time() - started, 1),
    }
    write_stats(out / "stats.json", stats)
    return stats
