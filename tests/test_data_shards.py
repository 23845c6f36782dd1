"""Shard lists, reading, atomic writing, and the resumable training stream."""

from __future__ import annotations

import io
import os
import random
import tarfile
from collections import Counter

import pytest
import torch
from PIL import Image

from openblip.data.shards import (
    ShardWriter,
    expand_braces,
    expand_urls,
    iter_samples,
    parse_weights,
    write_shard,
)
from openblip.data.stream import WebImageTextDataset, make_loader
from openblip.transforms import train_transform


def _png(value: int, size: int = 12) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (value % 256, (value * 7) % 256, (value * 13) % 256)).save(buffer, "PNG")
    return buffer.getvalue()


def _sample(shard: int, index: int, **override) -> dict:
    key = f"{shard:05d}{index:04d}"
    sample = {
        "__key__": key,
        "png": _png(shard * 100 + index),
        "txt": f"A picture, number {key}!",
        "json": {"shard": shard, "index": index},
    }
    sample.update(override)
    return {k: v for k, v in sample.items() if v is not None}


def _make_shards(directory, shards: int = 4, per_shard: int = 10, prefix: str = "train") -> str:
    for shard in range(shards):
        write_shard(directory / f"{prefix}-{shard:05d}.tar", [_sample(shard, i) for i in range(per_shard)])
    return str(directory / f"{prefix}-{{00000..{shards - 1:05d}}}.tar")


def _collect(dataset, num_workers: int = 0) -> list[dict]:
    return list(make_loader(dataset, num_workers=num_workers))


def _flat(batches) -> list[tuple[str, str, torch.Tensor]]:
    return [(k, t, img) for b in batches for k, t, img in zip(b["key"], b["text"], b["image"])]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(x[:2] == y[:2] and torch.equal(x[2], y[2]) for x, y in zip(a, b))


# -- shard lists ------------------------------------------------------------------------


def test_expand_braces():
    assert expand_braces("s/train-{00000..00003}.tar") == [f"s/train-0000{i}.tar" for i in range(4)]
    assert expand_braces("{8..11}") == ["8", "9", "10", "11"]
    assert expand_braces("{08..11}") == ["08", "09", "10", "11"]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert expand_braces("{x,{y,z}}") == ["x", "y", "z"]
    assert expand_braces("{0..10..5}") == ["0", "5", "10"]
    assert expand_braces("{2..0}") == ["2", "1", "0"]
    assert expand_braces("plain{}/{only}.tar") == ["plain{}/{only}.tar"]


def test_expand_urls_sources_globs_dirs_and_errors(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _make_shards(tmp_path / "a", shards=3, per_shard=1)
    _make_shards(tmp_path / "b", shards=2, per_shard=1)
    a = [str(tmp_path / "a" / f"train-{i:05d}.tar") for i in range(3)]
    b = [str(tmp_path / "b" / f"train-{i:05d}.tar") for i in range(2)]
    assert expand_urls(f"{tmp_path}/a/train-{{00000..00002}}.tar::{tmp_path}/b/*.tar") == [a, b]
    assert expand_urls([str(tmp_path / "a"), [b[1], b[0]]]) == [a, [b[1], b[0]]]
    assert expand_urls(f"file://{a[0]}") == [[a[0]]]
    with pytest.raises(FileNotFoundError, match=r"1 of 4 shards missing.*train-00003"):
        expand_urls(f"{tmp_path}/a/train-{{00000..00003}}.tar")
    with pytest.raises(FileNotFoundError, match="nothing.tar|no shard matches"):
        expand_urls(f"{tmp_path}/a/nothing*.tar")
    with pytest.raises(ValueError, match="only local"):
        expand_urls("s3://bucket/train-{0..3}.tar")
    with pytest.raises(ValueError, match="stray"):
        expand_urls(f"{a[0]}::")
    assert parse_weights("3::1", 2) == [3.0, 1.0]
    assert parse_weights(None, 3) == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError):
        parse_weights([1.0], 2)


# -- reading and writing ----------------------------------------------------------------


def test_write_and_read_back_img2dataset_layout(tmp_path):
    with ShardWriter(str(tmp_path / "part-%05d.tar"), maxcount=3) as writer:
        for i in range(7):
            writer.write({"jpg": Image.new("RGB", (8, 8), (i, 0, 0)), "txt": f"caption {i}", "json": {"i": i}})
    assert [os.path.basename(p) for p in writer.paths] == ["part-00000.tar", "part-00001.tar", "part-00002.tar"]
    with tarfile.open(writer.paths[1]) as tar:
        names = tar.getnames()
    assert names[:3] == ["000010000.jpg", "000010000.json", "000010000.txt"]
    samples = [s for p in writer.paths for s in iter_samples(p)]
    assert [s["__key__"] for s in samples][:4] == ["000000000", "000000001", "000000002", "000010000"]
    assert samples[4]["txt"] == "caption 4" and samples[4]["json"] == {"i": 4}
    assert Image.open(io.BytesIO(samples[4]["jpg"])).size == (8, 8)
    assert samples[0]["__shard__"] == writer.paths[0]


def test_atomic_writer_leaves_nothing_when_interrupted(tmp_path):
    def failing():
        yield _sample(0, 0)
        yield _sample(0, 1)
        raise KeyboardInterrupt("simulated interruption")

    with pytest.raises(KeyboardInterrupt):
        write_shard(tmp_path / "train-00000.tar", failing())
    assert os.listdir(tmp_path) == []
    with pytest.raises(RuntimeError), ShardWriter(str(tmp_path / "w-%05d.tar"), maxcount=2) as writer:
        for i in range(3):
            writer.write(_sample(0, i))
        raise RuntimeError("crash while the second shard is open")
    assert os.listdir(tmp_path) == ["w-00000.tar"]  # the completed shard only, no temp file
    assert len(list(iter_samples(tmp_path / "w-00000.tar"))) == 2


def test_corrupt_and_truncated_shards_are_counted_not_raised(tmp_path, caplog):
    path = tmp_path / "good.tar"
    write_shard(path, [_sample(0, i) for i in range(5)] + [_sample(0, 5, json=None)])
    data = path.read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.tar").write_bytes(b"this is not a tar file" * 50)
    stats = Counter()
    assert len(list(iter_samples(path, stats=stats))) == 6 and not stats
    partial = list(iter_samples(tmp_path / "cut.tar", stats=stats))
    assert 0 < len(partial) < 6 and all("png" in s and "txt" in s for s in partial)
    assert list(iter_samples(tmp_path / "garbage.tar", stats=stats)) == []
    assert stats["shard_error"] == 2
    assert "cut.tar" in caplog.text and "garbage.tar" in caplog.text


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_reads_long_names_in_every_tar_format_and_compressed(tmp_path, fmt):
    members = [
        (f"./{'d' * 120}/sample{i}.{ext}", data)
        for i in range(3)
        for ext, data in (("jpg", bytes([i]) * 700), ("txt", f"caption {i}".encode()))
    ]
    for mode, name in (("w", "s.tar"), ("w:gz", "s.tar.gz")):
        with tarfile.open(tmp_path / name, mode, format=fmt) as tar:
            directory = tarfile.TarInfo("ignored-directory")
            directory.type = tarfile.DIRTYPE
            tar.addfile(directory)
            for member, data in members:
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    plain, packed = (list(iter_samples(tmp_path / n, lazy=["jpg"])) for n in ("s.tar", "s.tar.gz"))
    assert [s["__key__"] for s in plain] == [f"{'d' * 120}/sample{i}" for i in range(3)]
    assert [s["jpg"].read() for s in plain] == [s["jpg"] for s in packed] == [bytes([i]) * 700 for i in range(3)]
    assert [s["txt"] for s in plain] == [s["txt"] for s in packed] == [f"caption {i}" for i in range(3)]


def test_undecodable_member_is_dropped_from_its_sample(tmp_path):
    path = tmp_path / "s.tar"
    write_shard(path, [_sample(0, 0, json=b"{not json"), _sample(0, 1, txt=b"\xff\xfe bad utf8")])
    stats = Counter()
    samples = list(iter_samples(path, stats=stats))
    assert "json" not in samples[0] and "txt" not in samples[1] and stats["member_error"] == 2


# -- the training stream ----------------------------------------------------------------


def _dataset(urls, **kw) -> WebImageTextDataset:
    options = {"transform": train_transform(16), "batch_size": 4, "seed": 3, "shuffle_buffer": 8}
    options.update(kw)
    return WebImageTextDataset(urls, **options)


def test_stream_yields_clean_batches_and_is_deterministic(tmp_path):
    urls = _make_shards(tmp_path)
    batches = _collect(_dataset(urls))
    assert len(batches) == 10 and batches[0]["image"].shape == (4, 3, 16, 16)
    assert batches[0]["text"][0].startswith("a picture, number ")  # pre_caption applied
    assert [b["position"] for b in batches] == list(range(0, 40, 4)) and batches[-1]["next_position"] == 40
    assert sorted(k for b in batches for k in b["key"]) == sorted(
        f"{s:05d}{i:04d}" for s in range(4) for i in range(10)
    )
    assert _same(_flat(batches), _flat(_collect(_dataset(urls))))
    other_epoch = _dataset(urls, epoch=1)
    assert [k for b in _collect(other_epoch) for k in b["key"]] != [k for b in batches for k in b["key"]]


def test_num_workers_do_not_change_batches(tmp_path):
    urls = _make_shards(tmp_path, shards=3, per_shard=11)
    assert _same(_flat(_collect(_dataset(urls))), _flat(_collect(_dataset(urls), num_workers=2)))


def test_ranks_and_workers_cover_every_sample_exactly_once(tmp_path):
    urls = _make_shards(tmp_path, shards=4, per_shard=9)
    keys = []
    for rank in range(2):
        keys += [k for b in _collect(_dataset(urls, rank=rank, world_size=2), num_workers=2) for k in b["key"]]
    assert len(keys) == 36 and len(set(keys)) == 36


@pytest.mark.parametrize("start", [8, 13])
def test_exact_resume_reproduces_samples_and_augmentations(tmp_path, start):
    urls = _make_shards(tmp_path, shards=3, per_shard=10)
    full = _collect(_dataset(urls, epoch=2))
    resumed_ds = _dataset(urls)
    resumed_ds.set_epoch(2, start=start)
    resumed = _collect(resumed_ds, num_workers=2)
    assert _same(_flat(resumed), _flat(full)[start:])
    if start % 4 == 0:  # resuming at a batch boundary gives the very same batches
        assert [b["key"] for b in resumed] == [b["key"] for b in full[start // 4 :]]


def test_skips_are_counted_once_and_batches_keep_their_size(tmp_path):
    good = [_sample(0, i) for i in range(6)]
    bad = [
        _sample(1, 0, png=b"\x89PNG broken"),
        _sample(1, 1, txt="  ...  "),
        _sample(1, 2, png=None),
        _sample(1, 3, txt=None),
    ] + [_sample(1, i) for i in range(4, 8)]
    write_shard(tmp_path / "d-00000.tar", good)
    write_shard(tmp_path / "d-00001.tar", bad)
    write_shard(tmp_path / "d-00002.tar", [_sample(2, i) for i in range(4)])
    with tarfile.open(tmp_path / "d-00002.tar") as tar:
        third_sample = tar.getmembers()[6].offset
    data = (tmp_path / "d-00002.tar").read_bytes()
    # Cut inside the third sample: the first survives, the second (maybe incomplete) is dropped.
    (tmp_path / "d-00002.tar").write_bytes(data[: third_sample + 100])
    for workers in (0, 2):
        batches = _collect(_dataset(f"{tmp_path}/d-{{00000..00002}}.tar", shuffle=False), num_workers=workers)
        total = sum((Counter(b["skipped"]) for b in batches), Counter())
        assert total == {"bad_image": 1, "no_caption": 2, "no_image": 1, "shard_error": 1}
        assert [len(b["text"]) for b in batches] == [4, 4, 4]  # 6 + 5 + 1 positions, bad image filled
        assert batches[-1]["next_position"] == 12
    shrunk = _collect(_dataset(f"{tmp_path}/d-{{00000..00002}}.tar", shuffle=False, fill_bad=False))
    assert sum(len(b["text"]) for b in shrunk) == 11


def test_source_mixing_follows_weights(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    urls = _make_shards(tmp_path / "a", shards=2, per_shard=20) + "::" + _make_shards(tmp_path / "b", 2, 20)

    def tiny(image, rng):  # decoding is not what this test is about
        return torch.zeros(3, 1, 1)

    dataset = _dataset(urls, transform=tiny, batch_size=250, samples_per_epoch=2000, weights="3::1")
    sources = torch.cat([b["source"] for b in _collect(dataset)])
    assert len(sources) == 2000 and abs(sources.float().mean().item() - 0.25) < 0.04
    with pytest.raises(ValueError, match="samples_per_epoch"):
        _dataset(urls)


def test_samples_per_epoch_and_resampling_give_equal_lengths(tmp_path):
    urls = _make_shards(tmp_path, shards=3, per_shard=5)  # 3 shards over 2 ranks: uneven
    for resampled in (False, True):
        lengths = {
            len(_flat(_collect(_dataset(urls, rank=r, world_size=2, samples_per_epoch=12, resampled=resampled))))
            for r in range(2)
        }
        assert lengths == {12}
    assert _dataset(urls, samples_per_epoch=10, drop_last=True).num_batches() == 2
    with pytest.raises(ValueError, match="cannot be split over 4 ranks"):
        _dataset(urls, world_size=4)


def test_caption_lines_and_plain_transforms_are_deterministic(tmp_path):
    write_shard(tmp_path / "m-00000.tar", [_sample(0, i, txt="first caption\nsecond caption\n") for i in range(8)])

    def plain(image):  # no rng argument: the global generators are seeded per sample
        return torch.rand(1) + random.random()

    random.seed(123)
    expected_next = random.random()
    random.seed(123)
    first = _collect(_dataset(str(tmp_path / "m-00000.tar"), transform=plain))
    assert random.random() == expected_next  # the caller's random stream is untouched
    again = _collect(_dataset(str(tmp_path / "m-00000.tar"), transform=plain))
    assert _same(_flat(first), _flat(again))
    assert {t for b in first for t in b["text"]} == {"first caption", "second caption"}


def test_group_key_names_positive_groups_from_the_json(tmp_path):
    # Samples of one shard share json["shard"]; a sample without the field is its own group.
    samples = [_sample(0, i) for i in range(3)] + [_sample(1, i) for i in range(2)] + [_sample(2, 0, json=None)]
    write_shard(tmp_path / "g-00000.tar", samples)
    batches = _collect(_dataset(str(tmp_path / "g-00000.tar"), group_key="shard", shuffle=False))
    groups = dict(zip((k for b in batches for k in b["key"]), (g for b in batches for g in b["group"])))
    assert groups == {"000000000": "shard=0", "000000001": "shard=0", "000000002": "shard=0",
                      "000010000": "shard=1", "000010001": "shard=1", "000020000": "000020000"}
    plain = _collect(_dataset(str(tmp_path / "g-00000.tar"), shuffle=False))
    assert [g for b in plain for g in b["group"]] == [k for b in plain for k in b["key"]]
