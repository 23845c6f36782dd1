"""Dataset builders and ``openblip data`` on fake package layouts (and on the real ones if installed)."""

from __future__ import annotations

import gzip
import io
import json
import os
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from openblip.data import cli
from openblip.data.builders import fashion_mnist, openclipart
from openblip.data.shards import expand_urls, iter_samples


def _samples(pattern: str) -> list[dict]:
    return [s for paths in expand_urls(pattern) for p in paths for s in iter_samples(p)]


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as file:
        file.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture()
def fake_fashion(tmp_path, monkeypatch):
    root = tmp_path / "fashion-mnist"
    root.mkdir()
    rng = np.random.default_rng(0)
    for prefix, count in (("train", 23), ("t10k", 7)):
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (count, 28, 28)))
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(count) % 10)
    monkeypatch.setattr(fashion_mnist, "DATA_DIR", root)
    return root


SVG = """<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" xmlns:dc="http://purl.org/dc/elements/1.1/"
     xmlns:cc="http://web.resource.org/cc/" xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <metadata><rdf:RDF><cc:Work rdf:about="">
    <dc:title>{title}</dc:title>
    <dc:description>{description}</dc:description>
    <dc:creator><cc:Agent><dc:title>Some Artist</dc:title></cc:Agent></dc:creator>
  </cc:Work></rdf:RDF></metadata>
  <rect width="10" height="10"/>
</svg>"""


@pytest.fixture()
def fake_clipart(tmp_path, monkeypatch):
    root = tmp_path / "openclipart"
    items = {
        "animals/cat": ("Gatto", "Un gatto nero\n  che dorme"),
        "animals/birds/owl": ("Owl", "Owl"),  # description repeating the title is dropped
        "office/pen": ("", ""),  # no title: skipped
        "food/apple": ("Apple", "Clipart by Someone"),
        "food/pear": None,  # malformed SVG
        "signs/stop": ("Stop sign", ""),
    }
    for index, (name, text) in enumerate(items.items()):
        png, svg = root / "png" / f"{name}.png", root / "svg" / f"{name}.svg"
        png.parent.mkdir(parents=True, exist_ok=True)
        svg.parent.mkdir(parents=True, exist_ok=True)
        size = (800, 400) if name == "signs/stop" else (40, 30)
        Image.new("RGBA", size, (255, 0, 0, 0 if name == "animals/cat" else 255)).save(png)
        svg.write_text("<svg><unclosed>" if text is None else SVG.format(title=text[0], description=text[1]))
    Image.new("RGB", (10, 10)).save(root / "png" / "animals" / "no_svg.png")
    os.symlink("../cat.png", root / "png" / "animals" / "birds" / "cat.png")  # duplicate: ignored
    monkeypatch.setattr(openclipart, "ROOT", root)
    return root


def test_fashion_mnist_builder(fake_fashion, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["data", "fashion-mnist", "--out", str(out), "--train-shards", "3", "--seed", "4"]) == 0
    printed = capsys.readouterr().out
    assert f"--train-data '{out}/train-{{00000..00002}}.tar'" in printed
    train, test = _samples(f"{out}/train-{{00000..00002}}.tar"), _samples(f"{out}/test-00000.tar")
    assert len(train) == 23 and len(test) == 7 and train[7]["__key__"] == "000000007"
    assert train[8]["__key__"] == "000010000"  # 8 per shard; 5-digit shard + 4-digit index
    sample = train[7]
    assert sample["json"] == {
        "label": 7,
        "class_name": "Sneaker",
        "source": "fashion-mnist",
        "split": "train",
        "index": 7,
        "width": 28,
        "height": 28,
    }
    assert sample["txt"].endswith("a sneaker") or "a sneaker " in sample["txt"]
    assert Image.open(io.BytesIO(sample["png"])).size == (28, 28)
    assert len({s["txt"].replace(fashion_mnist._NOUNS[s["json"]["label"]], "") for s in train}) > 3  # phrasings vary
    stats = json.loads((out / "stats.json").read_text())
    assert stats["train"]["samples"] == 23 and stats["test"]["samples"] == 7
    again = tmp_path / "again"
    fashion_mnist.build(again, train_shards=1, seed=4, limit=5, test_size=2)
    assert [s["txt"] for s in _samples(f"{again}/train-00000.tar")] == [s["txt"] for s in train[:5]]
    assert len(_samples(f"{again}/test-00000.tar")) == 2


def test_openclipart_builder(fake_clipart, tmp_path):
    stats = openclipart.build(tmp_path / "out", train_shards=2, test_fraction=0.0, max_side=64)
    assert stats["skipped"] == {"no_svg": 1, "no_title": 1, "svg_malformed": 1}
    samples = {s["json"]["name"]: s for s in _samples(stats["train"]["pattern"])}
    assert sorted(samples) == ["animals/birds/owl", "animals/cat", "food/apple", "signs/stop"]
    assert samples["animals/cat"]["txt"] == "Gatto. Un gatto nero che dorme"
    assert samples["animals/birds/owl"]["txt"] == "Owl"
    assert samples["food/apple"]["txt"] == "Apple. Clipart by Someone"  # noise kept on purpose
    cat = Image.open(io.BytesIO(samples["animals/cat"]["jpg"]))
    assert cat.getpixel((5, 5))[0] > 240 and cat.getpixel((5, 5))[1] > 240  # transparent -> white
    stop = Image.open(io.BytesIO(samples["signs/stop"]["jpg"]))
    assert stop.size == (64, 32) and samples["signs/stop"]["json"]["original_width"] == 800
    assert stats["test"]["samples"] == 0


def test_openclipart_split_is_stable(fake_clipart, tmp_path):
    one = openclipart.build(tmp_path / "a", test_fraction=0.5, seed=1)
    two = openclipart.build(tmp_path / "b", test_fraction=0.5, seed=2)
    test_one, test_two = (sorted(s["json"]["name"] for s in _samples(x["test"]["pattern"])) for x in (one, two))
    assert test_one == test_two and one["train"]["samples"] + one["test"]["samples"] == 4


@pytest.mark.parametrize(
    "dataset, package", [("fashion-mnist", "dataset-fashion-mnist"), ("openclipart", "openclipart-png openclipart-svg")]
)
def test_missing_package_exits_2_with_install_hint(tmp_path, capsys, dataset, package):
    code = cli.main(["data", dataset, "--out", str(tmp_path / "o"), "--source-dir", str(tmp_path / "none")])
    assert code == 2
    assert f"apt-get install -y {package}" in capsys.readouterr().err


def test_existing_shards_need_overwrite(fake_fashion, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["data", "fashion-mnist", "--out", str(out), "--limit", "3"]) == 0
    assert cli.main(["data", "fashion-mnist", "--out", str(out), "--limit", "3"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (
        cli.main(["data", "fashion-mnist", "--out", str(out), "--limit", "3", "--train-shards", "1", "--overwrite"])
        == 0
    )
    assert sorted(p.name for p in out.glob("*.tar")) == ["test-00000.tar", "train-00000.tar"]


@pytest.mark.skipif(not fashion_mnist.DATA_DIR.is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist_smoke(tmp_path):
    stats = fashion_mnist.build(tmp_path, limit=50)
    samples = _samples(stats["train"]["pattern"])
    assert len(samples) == 50 and stats["test"]["samples"] == 50
    assert Counter(s["json"]["class_name"] for s in samples).keys() <= set(fashion_mnist.CLASS_NAMES)


@pytest.mark.skipif(not (openclipart.ROOT / "svg").is_dir(), reason="openclipart-png/-svg not installed")
def test_real_openclipart_smoke(tmp_path):
    stats = openclipart.build(tmp_path, limit=50)
    samples = _samples(stats["train"]["pattern"]) + _samples(stats["test"]["pattern"])
    assert 30 <= len(samples) <= 50 and all(s["txt"].strip() for s in samples)
    assert all(max(s["json"]["width"], s["json"]["height"]) <= 384 for s in samples)
