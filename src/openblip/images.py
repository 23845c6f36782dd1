"""Image loading for files as people actually have them.

`load_image` turns a path, raw bytes, a binary file object or a PIL image into an
8-bit RGB `PIL.Image.Image`, handling EXIF orientation, transparency, CMYK, 16-bit
and floating-point grayscale, and reporting every failure as an `ImageError` that
names the file and the problem. `find_images` expands directories into image files.
"""

from __future__ import annotations

import errno
import io
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "ImageError",
    "ImageNotFoundError",
    "ImageSource",
    "find_images",
    "load_image",
]

# Pillow raises DecompressionBombError above twice Image.MAX_IMAGE_PIXELS
# (2 * 89_478_485 with default settings); use the same number, but check it
# ourselves so the limit does not depend on mutable global state.
DEFAULT_MAX_PIXELS = 178_956_970

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
)

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO, Image.Image]

# Alpha is composited onto white: most transparent images in captioning data are
# logos, icons and cut-outs designed for a light page background.
_BACKGROUND = (255, 255, 255)
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_HIGH_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


class ImageError(ValueError):
    """An image could not be loaded; the message names the file and the problem."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"{name}: {problem}")
        self.name = name
        self.problem = problem


class ImageNotFoundError(ImageError, FileNotFoundError):
    """The path does not exist (also a `FileNotFoundError`, so either can be caught)."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(name, problem)
        self.errno, self.strerror, self.filename = errno.ENOENT, problem, name

    def __str__(self) -> str:  # OSError would otherwise format its own message
        return f"{self.name}: {self.problem}"


def load_image(source: ImageSource, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Load an image and return it as an 8-bit RGB `PIL.Image.Image`.

    Args:
        source: a path (``str`` / ``os.PathLike``), the encoded file as ``bytes``, a
            binary file object, or a ``PIL.Image.Image`` (which is not modified).
        max_pixels: largest allowed ``width * height``, checked from the header
            before any pixel data is decoded (decompression-bomb protection);
            ``None`` disables the check. Pillow's own global limit
            (``PIL.Image.MAX_IMAGE_PIXELS``) still applies on top of this one.

    Conversions, in order:
        * The whole file is decoded immediately, so truncated or corrupt data fails
          here rather than later inside a data loader. Only the first frame of
          animated or multi-page files is used.
        * EXIF orientation is applied (phone photos come out upright).
        * Transparency (RGBA, LA, palette or grayscale with a transparent colour) is
          composited onto a WHITE background.
        * 16-bit grayscale (``I;16*``) is scaled by 255/65535. 32-bit integer
          (``I``) is treated as 16-bit when its values lie in 0..65535, otherwise
          min-max stretched. Float (``F``) is multiplied by 255 when in [0, 1],
          kept when in [0, 255], otherwise min-max stretched.
        * CMYK, 1-bit, grayscale, YCbCr etc. use Pillow's ``convert("RGB")``.
          Embedded ICC profiles are ignored, as in the original BLIP pipeline
          (``Image.open(path).convert("RGB")``).

    Raises:
        ImageNotFoundError: the path does not exist.
        ImageError: anything else: a directory, an empty file, not an image,
            truncated/corrupt data, too many pixels, an unsupported mode.
    """
    if isinstance(source, Image.Image):
        _check_pixels("<PIL image>", source.size, max_pixels)
        rgb = _to_rgb("<PIL image>", _decode("<PIL image>", source))
        return rgb.copy() if rgb is source else rgb
    name, opener = _opener(source)
    try:
        with opener() as image:
            _check_pixels(name, image.size, max_pixels)
            rgb = _to_rgb(name, _decode(name, image))
            # Closing `image` invalidates it, so never hand it out.
            return rgb.copy() if rgb is image else rgb
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(name, f"{exc} (Pillow's global PIL.Image.MAX_IMAGE_PIXELS limit)") from exc
    except UnidentifiedImageError as exc:
        raise ImageError(name, "not a recognised image file (unknown or unsupported format)") from exc
    except PermissionError as exc:
        raise ImageError(name, "permission denied") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(name, f"cannot read image: {exc}") from exc


def _opener(source: ImageSource) -> tuple[str, Callable[[], Image.Image]]:
    """Return (display name, zero-argument callable opening the image) after cheap checks."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise ImageError("<bytes>", "empty data (0 bytes)")
        return "<bytes>", lambda: Image.open(io.BytesIO(data))
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        name = str(path)
        if not path.exists():
            raise ImageNotFoundError(name, "no such file")
        if path.is_dir():
            raise ImageError(name, "is a directory, not an image file")
        if path.stat().st_size == 0:
            raise ImageError(name, "empty file (0 bytes)")
        return name, lambda: Image.open(path)
    if hasattr(source, "read"):
        name = str(getattr(source, "name", "<file object>"))
        return name, lambda: Image.open(source)
    raise TypeError(f"load_image: unsupported source type {type(source).__name__}")


def _check_pixels(name: str, size: tuple[int, int], max_pixels: int | None) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageError(name, f"invalid image size {width}x{height}")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError(
            name,
            f"{width}x{height} = {width * height} pixels exceeds the limit of "
            f"max_pixels={max_pixels} (possible decompression bomb)",
        )


def _decode(name: str, image: Image.Image) -> Image.Image:
    """Force a full decode (catches truncation) and apply EXIF orientation."""
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError, IndexError) as exc:
        raise ImageError(name, f"truncated or corrupt image data ({exc})") from exc
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - malformed EXIF must not make a good image unreadable
        return image


def _to_rgb(name: str, image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB (see `load_image` for the rules)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _HIGH_BIT_MODES or mode == "F":
        return Image.fromarray(_to_uint8(np.asarray(image), mode), "L").convert("RGB")
    if mode in _ALPHA_MODES or image.info.get("transparency") is not None or _rgba_palette(image):
        return _flatten_alpha(name, image)
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageError(name, f"cannot convert image mode {mode!r} to RGB ({exc})") from exc


def _rgba_palette(image: Image.Image) -> bool:
    palette = image.palette if image.mode == "P" else None
    return palette is not None and palette.mode == "RGBA"


def _flatten_alpha(name: str, image: Image.Image) -> Image.Image:
    try:
        rgba = image.convert("RGBA")
    except (ValueError, OSError) as exc:
        raise ImageError(name, f"cannot convert image mode {image.mode!r} to RGBA ({exc})") from exc
    background = Image.new("RGBA", rgba.size, _BACKGROUND + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Map high-bit-depth or float grayscale values to 0..255."""
    values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if mode.startswith("I;16") or (mode == "I" and low >= 0 and high <= 65535):
        scaled = values * (255.0 / 65535.0)
    elif mode == "F" and low >= 0 and high <= 1.0:
        scaled = values * 255.0
    elif mode == "F" and low >= 0 and high <= 255.0:
        scaled = values
    elif high > low:
        scaled = (values - low) * (255.0 / (high - low))
    else:  # constant image outside the ranges above
        scaled = np.zeros_like(values)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def find_images(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """Expand paths into a list of image files.

    Directories are searched recursively for files whose extension (any case) is in
    `IMAGE_EXTENSIONS`, skipping hidden files and folders (names starting with ".",
    e.g. macOS "._photo.jpg" resource forks); each directory's results are sorted.
    Explicit files are kept as given, whatever their extension. Order follows the
    arguments; a file reached twice is listed once.

    Raises:
        ImageNotFoundError: (a `FileNotFoundError`) a path does not exist.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    found: dict[Path, None] = {}
    for entry in paths:
        path = Path(entry)
        if path.is_dir():
            found.update(dict.fromkeys(_images_under(path)))
        elif path.exists():
            found[path] = None
        else:
            raise ImageNotFoundError(str(path), "no such file or directory")
    return list(found)


def _images_under(root: Path) -> list[Path]:
    hits = []
    for path in root.rglob("*"):
        relative = path.relative_to(root).parts
        if any(part.startswith(".") for part in relative):
            continue
        if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
            hits.append(path)
    return sorted(hits)
