"""Map-style annotation datasets, the resumable sampler, and retrieval eval sets."""

from __future__ import annotations

import csv
import functools
import json

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from openblip.data.annotations import (
    ImageTextDataset,
    ResumableSampler,
    collate_skip_none,
    load_retrieval_json,
    load_retrieval_shards,
)
from openblip.data.shards import write_shard
from openblip.transforms import eval_transform, train_transform


@pytest.fixture()
def image_root(tmp_path):
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (20, 14), (40 * i, 0, 0)).save(root / "sub" / f"img{i}.jpg")
    (root / "sub" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return root


def _write_json(path, data):
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_original_json_list(tmp_path, image_root):
    ann = _write_json(
        tmp_path / "train.json",
        [
            {"image": "sub/img0.jpg", "caption": "A dog (running)!", "image_id": "coco_7"},
            {"image": "sub/img0.jpg", "caption": "Another caption.", "image_id": "coco_7"},
            {"image": "sub/img1.jpg", "caption": ["first option", "second option"], "image_id": 3},
            {"image": "sub/img2.jpg", "caption": "   ", "image_id": 4},
            {"image": "sub/broken.jpg", "caption": "broken image", "image_id": 5},
        ],
    )
    dataset = ImageTextDataset.from_json(ann, image_root, train_transform(16), seed=1)
    assert len(dataset) == 4 and dataset.skipped == {"no_caption": 1}
    first = dataset[0]
    assert first["text"] == "a dog running" and first["image"].shape == (3, 16, 16)
    assert [dataset[i]["index"] for i in range(3)] == [0, 0, 1]  # image_id remapped densely
    assert dataset[3] is None and dataset.skipped["bad_image"] == 1
    assert torch.equal(dataset[2]["image"], dataset[2]["image"])  # same (seed, epoch, index), same draw
    texts = set()
    for epoch in range(12):
        dataset.set_epoch(epoch)
        texts.add(dataset[2]["text"])
    assert texts == {"first option", "second option"}


def test_collate_drops_or_fills_bad_items(tmp_path, image_root):
    ann = _write_json(
        tmp_path / "a.json", [{"image": f"sub/{n}.jpg", "caption": n} for n in ("img0", "broken", "img1")]
    )
    dataset = ImageTextDataset.from_json(ann, image_root, eval_transform(8))
    batch = next(iter(DataLoader(dataset, batch_size=3, collate_fn=collate_skip_none)))
    assert batch["image"].shape == (2, 3, 8, 8) and batch["text"] == ["img0", "img1"]
    assert batch["skipped"] == {"bad_image": 1}
    filled = next(iter(DataLoader(dataset, batch_size=3, collate_fn=functools.partial(collate_skip_none, fill=True))))
    assert filled["text"] == ["img0", "img1", "img1"] and filled["skipped"] == {"bad_image": 1}
    assert collate_skip_none([None, None]) is None


def test_folder_with_jsonl_or_csv(tmp_path, image_root):
    lines = [{"file_name": "sub/img0.jpg", "text": "from jsonl"}, {"image": "sub/img1.jpg", "caption": ""}]
    (image_root / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n{broken\n")
    dataset = ImageTextDataset.from_folder(image_root, eval_transform(8))
    assert len(dataset) == 1 and dataset[0]["text"] == "from jsonl"
    assert dataset.skipped == {"no_caption": 1, "no_image": 1}
    with open(tmp_path / "captions.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["filepath", "caption"])
        writer.writerow(["sub/img2.jpg", "from csv, with a comma"])
        writer.writerow([str(image_root / "sub" / "img3.jpg"), "absolute path"])
    dataset = ImageTextDataset.from_folder(image_root, eval_transform(8), annotations=tmp_path / "captions.csv")
    assert [dataset[i]["text"] for i in range(2)] == ["from csv, with a comma", "absolute path"]


def test_resumable_sampler_splits_and_resumes():
    samplers = [ResumableSampler(10, rank=r, world_size=3, seed=5) for r in range(3)]
    for sampler in samplers:
        sampler.set_epoch(2)
    parts = [list(s) for s in samplers]
    assert all(len(p) == 4 for p in parts) and set().union(*parts) == set(range(10))
    samplers[1].set_epoch(2, start=3)
    assert list(samplers[1]) == parts[1][3:] and len(samplers[1]) == 1
    other = ResumableSampler(10, rank=0, world_size=3, seed=5)
    other.set_epoch(3)
    assert list(other) != parts[0]


def test_retrieval_eval_from_json(tmp_path, image_root):
    ann = _write_json(
        tmp_path / "test.json",
        [
            {"image": "sub/img0.jpg", "caption": ["one.", "two"]},
            {"image": "sub/img1.jpg", "caption": ["three"]},
            {"image": "sub/img2.jpg", "caption": []},
            {"image": "sub/broken.jpg", "caption": ["four", "five"]},
        ],
    )
    evalset = load_retrieval_json(ann, image_root, eval_transform(8))
    assert evalset.texts == ["one", "two", "three", "four", "five"]
    assert evalset.img2txt == [[0, 1], [2], [3, 4]] and evalset.txt2img == [0, 0, 1, 2, 2]
    image, index = evalset[2]
    assert index == 2 and image.shape == (3, 8, 8) and not image.any()  # unreadable -> zeros
    assert evalset.skipped == {"no_caption": 1, "bad_image": 1}


def test_retrieval_eval_from_shards_groups_by_key(tmp_path, image_root):
    jpg = (image_root / "sub" / "img0.jpg").read_bytes()
    write_shard(
        tmp_path / "eval-00000.tar",
        [
            {"__key__": "a", "jpg": jpg, "txt": "Line one.\nLine two\n"},
            {"__key__": "b", "jpg": jpg, "txt": "ignored", "json": {"captions": ["from json"]}},
            {"__key__": "c", "jpg": jpg, "txt": ""},
        ],
    )
    write_shard(tmp_path / "eval-00001.tar", [{"__key__": "a", "txt": "line three"}])
    evalset = load_retrieval_shards(f"{tmp_path}/eval-{{00000..00001}}.tar", eval_transform(8))
    assert evalset.keys == ["a", "b"] and evalset.texts == ["line one", "line two", "line three", "from json"]
    assert evalset.img2txt == [[0, 1, 2], [3]] and evalset.txt2img == [0, 0, 0, 1]
    assert evalset.skipped == {"no_caption": 1}
    assert evalset[1][0].shape == (3, 8, 8)
