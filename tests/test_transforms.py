"""Tests for openblip.transforms: eval/train preprocessing and RandomAugment."""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from openblip.images import load_image
from openblip.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    RANDAUGMENT_OPS,
    RandomAugment,
    apply_augment_op,
    batch_images,
    eval_transform,
    sample_crop_params,
    to_tensor,
    train_transform,
)

GREY = (128, 128, 128)


def _photo(name: str) -> Image.Image:
    skimage_data = pytest.importorskip("skimage.data")
    return load_image(Path(os.path.dirname(skimage_data.__file__)) / name)


@pytest.fixture(scope="module")
def small_photo() -> Image.Image:
    return _photo("chelsea.png").resize((96, 64), Image.BICUBIC)


# ---------------------------------------------------------------------------- eval


def test_to_tensor_and_normalisation_values():
    tensor = to_tensor(Image.new("RGB", (2, 3), (255, 0, 51)))
    assert tensor.shape == (3, 3, 2) and tensor.dtype == torch.float32
    assert tensor[:, 0, 0].tolist() == pytest.approx([1.0, 0.0, 0.2])
    out = eval_transform(4)(Image.new("RGB", (7, 5), (255, 255, 255)))
    expected = [(1 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD)]
    assert out[:, 1, 2].tolist() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("name", ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg"])
def test_eval_transform_on_real_photos(name):
    out = eval_transform(384)(_photo(name))
    assert out.shape == (3, 384, 384) and out.dtype == torch.float32
    low = [(0 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD)]
    high = [(1 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD)]
    for channel in range(3):
        assert low[channel] - 1e-5 <= out[channel].min() <= out[channel].max() <= high[channel] + 1e-5
    assert -1.5 < out.mean() < 1.5 and 0.2 < out.std() < 1.5  # a photo, not a blank


def test_eval_transform_squashes_and_accepts_grayscale():
    out = eval_transform(32)(Image.new("L", (300, 20), 200))
    assert out.shape == (3, 32, 32)
    transform = pickle.loads(pickle.dumps(eval_transform(32)))
    assert torch.equal(transform(Image.new("L", (300, 20), 200)), out)


@pytest.mark.parametrize("name", ["astronaut.png", "chelsea.png"])
def test_eval_transform_matches_transformers(name):
    transformers = pytest.importorskip("transformers")
    processor_class = getattr(transformers, "BlipImageProcessorPil", None) or transformers.BlipImageProcessor
    processor = processor_class(size={"height": 384, "width": 384})
    image = _photo(name)
    theirs = processor(image, return_tensors="pt")["pixel_values"][0]
    ours = eval_transform(384)(image)
    assert (ours - theirs).abs().max().item() < 1e-5  # observed: 0.0 (both PIL bicubic)


def test_batch_images(small_photo):
    batch = batch_images([small_photo, small_photo.convert("L")], eval_transform(48))
    assert batch.shape == (2, 3, 48, 48)
    with pytest.raises(ValueError):
        batch_images([], eval_transform(48))


# ---------------------------------------------------------------------------- crop


def test_crop_params_respect_scale_and_ratio():
    rng = random.Random(0)
    width, height = 640, 427
    for _ in range(500):
        top, left, crop_h, crop_w = sample_crop_params(width, height, (0.5, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= top <= height - crop_h and 0 <= left <= width - crop_w
        fraction = crop_h * crop_w / (width * height)
        # Rounding of each side to whole pixels can move the area slightly.
        assert 0.5 - 0.01 <= fraction <= 1.0
        assert 3 / 4 - 0.01 <= crop_w / crop_h <= 4 / 3 + 0.01


def test_crop_params_fall_back_to_centre_crop():
    # No crop of >= 90% area with ratio in [3/4, 4/3] fits a 1000x10 strip.
    assert sample_crop_params(1000, 10, (0.9, 1.0), (3 / 4, 4 / 3), random.Random(0)) == (0, 493, 10, 13)
    assert sample_crop_params(10, 1000, (0.9, 1.0), (3 / 4, 4 / 3), random.Random(0)) == (493, 0, 13, 10)


# ---------------------------------------------------------------------------- train


def test_train_transform_shape_and_seeding(small_photo):
    transform = train_transform(40)
    random.seed(123)
    first = transform(small_photo)
    random.seed(123)
    again = transform(small_photo)
    assert first.shape == (3, 40, 40) and torch.equal(first, again)

    explicit = [transform(small_photo, rng=random.Random(7)) for _ in range(2)]
    assert torch.equal(*explicit)
    others = [transform(small_photo, rng=random.Random(seed)) for seed in range(8, 12)]
    assert all(not torch.equal(explicit[0], other) for other in others)


def test_train_transform_is_picklable_and_options(small_photo):
    transform = pickle.loads(pickle.dumps(train_transform(24, min_scale=0.2)))
    assert transform(small_photo, rng=random.Random(1)).shape == (3, 24, 24)
    plain = train_transform(24, min_scale=1.0, randaugment=False, hflip=False)
    square = small_photo.crop((0, 0, 64, 64))  # full-area crop is forced for a square
    expected = eval_transform(24)(square)
    assert torch.equal(plain(square, rng=random.Random(0)), expected)
    with pytest.raises(ValueError):
        train_transform(24, min_scale=0.0)


# ---------------------------------------------------------------------------- RandomAugment


@pytest.mark.parametrize("name", RANDAUGMENT_OPS)
def test_each_op_runs_on_a_real_image(small_photo, name):
    out = apply_augment_op(small_photo, name, 5, random.Random(0))
    assert out.mode == "RGB" and out.size == small_photo.size
    changed = not np.array_equal(np.asarray(out), np.asarray(small_photo))
    # Identity, and Brightness/Sharpness at magnitude 5 (factor 1.0), leave it alone.
    assert changed == (name not in ("Identity", "Brightness", "Sharpness"))


def test_enhance_ops_at_other_magnitudes(small_photo):
    brighter = apply_augment_op(Image.new("RGB", (2, 2), (100, 200, 10)), "Brightness", 10)
    assert brighter.getpixel((0, 0)) == (190, 255, 19)  # factor 1.9, clipped then truncated
    assert apply_augment_op(small_photo, "Sharpness", 10).size == small_photo.size


def _marker_image(size=(8, 8), at=(1, 2)) -> Image.Image:
    array = np.zeros((size[1], size[0], 3), np.uint8)
    array[at[1], at[0]] = 255
    return Image.fromarray(array)


class _PositiveSign(random.Random):
    """Always draws 0.5, which keeps every geometric op's magnitude positive
    (shear/translate negate when a draw is > 0.5, rotate when it is < 0.5)."""

    def random(self) -> float:
        return 0.5


def test_geometry_follows_opencv_conventions(small_photo):
    source = np.asarray(small_photo).astype(int)
    positive = _PositiveSign(0)
    # TranslateX with offset +5: dst(x) = src(x + 5), grey fill on the right.
    shifted = np.asarray(apply_augment_op(small_photo, "TranslateX", 5, positive)).astype(int)
    assert np.array_equal(shifted[:, :-5], source[:, 5:]) and (shifted[:, -5:] == 128).all()
    # ShearX with factor +0.15: dst(x, y) = src(x - 0.15 y, y); row 40 shifts by 6 px.
    sheared = np.asarray(apply_augment_op(small_photo, "ShearX", 5, positive)).astype(int)
    assert np.abs(sheared[40, 6:] - source[40, :-6]).max() <= 1 and (sheared[40, :6] == 128).all()
    # Rotate is counter-clockwise about (W/2, H/2) like cv2.getRotationMatrix2D; level 30
    # gives 90 degrees, which moves pixel (x=1, y=2) of an 8x8 image to (x=2, y=8-1); the
    # off-centre pivot leaves row 0 with no source pixel, so it is grey fill.
    rotated = np.asarray(apply_augment_op(_marker_image(), "Rotate", 30, positive))[..., 0]
    assert rotated[7, 2] >= 254 and rotated[1:].sum() == rotated[7, 2] and (rotated[0] == 128).all()


def test_random_augment_is_seeded_and_fills_grey(small_photo):
    augment = RandomAugment(2, 5)
    runs = [np.asarray(augment(small_photo, random.Random(3))) for _ in range(2)]
    assert np.array_equal(*runs)
    outputs = [np.asarray(augment(small_photo, random.Random(seed))) for seed in range(40)]
    assert any((out == GREY).all(axis=-1).any() for out in outputs)  # geometric ops ran
    assert any(np.array_equal(out, np.asarray(small_photo)) for out in outputs)  # p=0.5 skips
    only_identity = RandomAugment(2, 5, ops=["Identity"])
    assert np.array_equal(np.asarray(only_identity(small_photo, random.Random(0))), np.asarray(small_photo))
    with pytest.raises(ValueError):
        RandomAugment(ops=["Solarize"])
