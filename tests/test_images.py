"""Tests for openblip.images: loading awkward real-world files and finding images."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from openblip.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    ImageError,
    ImageNotFoundError,
    find_images,
    load_image,
)

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def _skimage_photo(name: str) -> Path:
    skimage_data = pytest.importorskip("skimage.data")
    return Path(os.path.dirname(skimage_data.__file__)) / name


def _close(pixel, expected, tol: int = 30) -> bool:
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(pixel, expected))


def _noise_jpeg(path: Path, size=(64, 64)) -> Path:
    noise = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, quality=95)
    return path


# ---------------------------------------------------------------------------- formats


def test_exif_orientation_6_is_applied(tmp_path):
    # Stored 40 wide x 20 high with a red block in the stored top-left corner.
    array = np.zeros((20, 40, 3), np.uint8)
    array[:8, :8] = RED
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "phone.jpg"
    Image.fromarray(array).save(path, exif=exif, quality=95)

    image = load_image(path)
    assert image.mode == "RGB" and image.size == (20, 40)
    # A clockwise quarter turn takes the top-left corner to the top-right.
    assert _close(image.getpixel((17, 2)), RED)
    assert _close(image.getpixel((2, 2)), (0, 0, 0))


def test_palette_png_with_transparency_goes_on_white(tmp_path):
    image = Image.new("P", (10, 4), 0)
    image.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    image.paste(1, (5, 0, 10, 4))
    path = tmp_path / "palette.png"
    image.save(path, transparency=0)

    loaded = load_image(path)
    assert loaded.mode == "RGB"
    assert loaded.getpixel((1, 1)) == WHITE  # transparent black -> white background
    assert loaded.getpixel((8, 1)) == BLUE


def test_rgba_and_la_composite_on_white(tmp_path):
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[:, 0] = (255, 0, 0, 0)  # fully transparent red
    rgba[:, 1] = (0, 255, 0, 255)  # opaque green
    rgba[:, 2] = (0, 0, 0, 128)  # half-transparent black
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba, "RGBA").save(path)
    loaded = load_image(path)
    assert loaded.getpixel((0, 0)) == WHITE
    assert loaded.getpixel((1, 0)) == GREEN
    assert _close(loaded.getpixel((2, 0)), (127, 127, 127), tol=2)

    la = Image.merge("LA", [Image.new("L", (2, 2), 0), Image.new("L", (2, 2), 0)])
    assert load_image(la).getpixel((0, 0)) == WHITE


def test_cmyk_jpeg(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path, quality=95)
    loaded = load_image(path)
    assert loaded.mode == "RGB"
    assert _close(loaded.getpixel((8, 8)), RED)


def test_16bit_png_gradient_is_scaled_not_clipped(tmp_path):
    gradient = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (4, 1))
    path = tmp_path / "deep.png"
    Image.fromarray(gradient).save(path)
    assert Image.open(path).mode in ("I", "I;16")

    values = np.asarray(load_image(path))[0, :, 0].astype(int)
    assert values[0] == 0 and values[-1] == 255
    assert abs(values[128] - 128) <= 1  # clipping would give 255 from ~column 1 onwards
    assert (np.diff(values) >= 0).all()
    assert len(np.unique(values)) > 250


def test_float_and_int_grayscale_modes():
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), "F")
    assert np.asarray(load_image(unit))[0, :, 0].tolist() == [0, 128, 255]
    wide = Image.fromarray(np.array([[-10.0, 0.0, 10.0]], np.float32), "F")
    assert np.asarray(load_image(wide))[0, :, 0].tolist() == [0, 128, 255]
    nan = Image.fromarray(np.array([[np.nan, 1.0]], np.float32), "F")
    assert np.asarray(load_image(nan))[0, :, 0].tolist() == [0, 255]
    big_int = Image.fromarray(np.array([[0, 100_000]], np.int32), "I")
    assert np.asarray(load_image(big_int))[0, :, 0].tolist() == [0, 255]


def test_grayscale_and_bilevel(tmp_path):
    path = tmp_path / "gray.png"
    Image.new("L", (3, 3), 77).save(path)
    assert load_image(path).getpixel((1, 1)) == (77, 77, 77)
    bilevel = Image.new("1", (3, 3), 1)
    assert load_image(bilevel).getpixel((0, 0)) == WHITE


def test_bytes_file_object_and_pil_sources(tmp_path):
    path = _noise_jpeg(tmp_path / "noise.jpg")
    reference = np.asarray(load_image(path))
    assert np.array_equal(np.asarray(load_image(path.read_bytes())), reference)
    with open(path, "rb") as handle:
        assert np.array_equal(np.asarray(load_image(handle)), reference)
    original = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert load_image(original).mode == "RGB" and original.mode == "RGBA"  # input untouched
    rgb = Image.new("RGB", (4, 4))
    assert load_image(rgb) is not rgb


def test_real_photos_load_as_rgb():
    for name, size in [("astronaut.png", (512, 512)), ("chelsea.png", (451, 300)),
                       ("coffee.png", (600, 400)), ("rocket.jpg", (640, 427))]:  # fmt: skip
        image = load_image(_skimage_photo(name))
        assert image.mode == "RGB" and image.size == size
        assert 20 < np.asarray(image).mean() < 235


# ---------------------------------------------------------------------------- errors


def test_truncated_jpeg_names_the_file(tmp_path):
    path = tmp_path / "cut.jpg"
    data = _noise_jpeg(tmp_path / "whole.jpg").read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated") as info:
        load_image(path)
    assert str(path) in str(info.value)
    assert not ImageFile.LOAD_TRUNCATED_IMAGES  # never switched on globally


def _bad_path(kind: str, directory: Path) -> Path:
    if kind == "directory":
        return directory
    path = directory / ("missing.jpg" if kind == "missing" else f"{kind}.jpg")
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("not an image")
    return path


@pytest.mark.parametrize(
    "kind, message",
    [("missing", "no such file"), ("directory", "directory"), ("empty", "empty"), ("text", "not a recognised image")],
)
def test_bad_paths_raise_image_error(tmp_path, kind, message):
    path = _bad_path(kind, tmp_path)
    with pytest.raises(ImageError, match=message) as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_missing_file_is_also_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "nope.png")
    assert issubclass(ImageNotFoundError, ImageError)


def test_bad_bytes_say_bytes():
    with pytest.raises(ImageError, match="<bytes>: empty"):
        load_image(b"")
    with pytest.raises(ImageError, match="<bytes>: not a recognised"):
        load_image(b"hello world")


def test_pixel_limit_checked_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("L", (1000, 1000)).save(path)
    with pytest.raises(ImageError, match="max_pixels=1000") as info:
        load_image(path, max_pixels=1000)
    assert "1000x1000" in str(info.value) and str(path) in str(info.value)
    assert load_image(path, max_pixels=None).size == (1000, 1000)

    # Header-only check: a file whose pixel data is cut off still reports the limit.
    cut = tmp_path / "cut_bomb.png"
    cut.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ImageError, match="exceeds the limit"):
        load_image(cut, max_pixels=1000)
    assert DEFAULT_MAX_PIXELS == 178_956_970


# ---------------------------------------------------------------------------- find_images


def test_find_images(tmp_path):
    root = tmp_path / "photos"
    for rel in ["b.JPG", "a.png", "notes.txt", "sub/c.webp", "sub/d.tiff", ".hidden/e.jpg", "._f.jpg"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    explicit = tmp_path / "caption-me.dat"
    explicit.write_bytes(b"x")

    found = find_images([explicit, root, root / "a.png"])
    assert found == [explicit, root / "a.png", root / "b.JPG", root / "sub/c.webp", root / "sub/d.tiff"]
    assert find_images(str(root / "sub")) == [root / "sub/c.webp", root / "sub/d.tiff"]
    assert {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"} <= set(IMAGE_EXTENSIONS)
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        find_images([root, tmp_path / "does-not-exist"])


def test_bytes_io_round_trip_of_gif_with_transparency():
    frame = Image.new("P", (4, 4), 0)
    frame.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    frame.paste(1, (2, 0, 4, 4))
    buffer = io.BytesIO()
    frame.save(buffer, format="GIF", transparency=0)
    loaded = load_image(buffer.getvalue())
    assert loaded.getpixel((0, 0)) == WHITE and loaded.getpixel((3, 0)) == RED
