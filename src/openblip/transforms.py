"""Image transforms of the original BLIP data pipeline, without torchvision.

Eval:  ``Resize((s, s), BICUBIC)`` (aspect ratio not kept, no crop) -> tensor -> CLIP normalise.
Train: ``RandomResizedCrop(s, scale=(min_scale, 1), BICUBIC)`` -> horizontal flip (p=0.5)
       -> ``RandomAugment(N=2, M=5)`` -> tensor -> CLIP normalise.

Randomness: every random draw of the training transform comes from one Python
``random.Random``. Pass it as ``transform(image, rng=rng)`` for per-sample
reproducibility (e.g. ``random.Random(f"{seed}-{epoch}-{index}")``); without it the
global ``random`` module is used, so ``random.seed(s)`` alone makes a run repeatable.
PyTorch seeds ``random`` differently in each DataLoader worker, so workers never
share a stream. The draws are not bit-compatible with torchvision's / numpy's
generators used by the original code; the distributions are the same.
"""

from __future__ import annotations

import math
import random
import types
from collections.abc import Callable, Sequence
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "RANDAUGMENT_OPS",
    "EvalTransform",
    "RandomAugment",
    "TrainTransform",
    "apply_augment_op",
    "batch_images",
    "eval_transform",
    "normalize",
    "sample_crop_params",
    "to_tensor",
    "train_transform",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_BICUBIC = Image.Resampling.BICUBIC if hasattr(Image, "Resampling") else Image.BICUBIC
_BILINEAR = Image.Resampling.BILINEAR if hasattr(Image, "Resampling") else Image.BILINEAR
_AFFINE = Image.Transform.AFFINE if hasattr(Image, "Transform") else Image.AFFINE

_FLIP = Image.Transpose.FLIP_LEFT_RIGHT if hasattr(Image, "Transpose") else Image.FLIP_LEFT_RIGHT

# A `random.Random`, or the `random` module itself (its global state).
Rng = Union[random.Random, types.ModuleType]


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 tensor (3, H, W) in [0, 1], like torchvision's ToTensor."""
    array = np.array(image.convert("RGB") if image.mode != "RGB" else image, dtype=np.uint8)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous().float().div(255)


def normalize(tensor: torch.Tensor, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """(tensor - mean) / std per channel, in float32 like torchvision's Normalize."""
    mean_t = torch.as_tensor(mean, dtype=tensor.dtype).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=tensor.dtype).view(-1, 1, 1)
    return tensor.sub(mean_t).div(std_t)


class EvalTransform:
    """Deterministic eval preprocessing: square bicubic resize, to tensor, normalise.

    A plain class (not a closure) so DataLoader worker processes can pickle it.
    """

    def __init__(self, image_size: int, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> None:
        self.image_size = int(image_size)
        self.mean = tuple(mean)
        self.std = tuple(std)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        rgb = image.convert("RGB") if image.mode != "RGB" else image
        # Squash to a square like the original (no aspect preservation, no crop).
        resized = rgb.resize((self.image_size, self.image_size), _BICUBIC)
        return normalize(to_tensor(resized), self.mean, self.std)

    def __repr__(self) -> str:
        return f"EvalTransform(image_size={self.image_size})"


def eval_transform(image_size: int) -> EvalTransform:
    """Eval transform of the original BLIP code for square inputs of `image_size`."""
    return EvalTransform(image_size)


# ----------------------------------------------------------------------------------------
# RandomResizedCrop


def sample_crop_params(
    width: int,
    height: int,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    rng: Rng | None = None,
) -> tuple[int, int, int, int]:
    """Sample a crop box ``(top, left, crop_height, crop_width)`` like torchvision's
    ``RandomResizedCrop.get_params``: up to 10 tries of an area fraction in `scale`
    and a log-uniform aspect ratio in `ratio`, then a centre crop clamped to `ratio`.
    """
    rng = random if rng is None else rng
    area = width * height
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_low, log_high))
        crop_w = int(round(math.sqrt(target_area * aspect)))
        crop_h = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = rng.randint(0, height - crop_h)
            left = rng.randint(0, width - crop_w)
            return top, left, crop_h, crop_w
    return _center_crop_params(width, height, ratio)


def _center_crop_params(width: int, height: int, ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    in_ratio = width / height
    if in_ratio < min(ratio):
        crop_w, crop_h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        crop_w, crop_h = int(round(height * max(ratio))), height
    else:
        crop_w, crop_h = width, height
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


# ----------------------------------------------------------------------------------------
# RandomAugment (original transform/randaugment.py, used with N=2, M=5)

MAX_LEVEL = 10
TRANSLATE_CONST = 10
FILL = (128, 128, 128)
RANDAUGMENT_OPS = (
    "Identity", "AutoContrast", "Brightness", "Sharpness", "Equalize",
    "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate",
)  # fmt: skip


def _warp_affine(image: Image.Image, forward: np.ndarray, fill: tuple[int, int, int]) -> Image.Image:
    """Apply a cv2-style forward affine matrix (dst = M @ src, integer pixel centres)
    with bilinear sampling, as ``cv2.warpAffine`` did in the original code.

    PIL wants the inverse map and puts pixel centres at +0.5, so the translation is
    corrected by half a pixel to sample the same source points as OpenCV.
    """
    linear_inv = np.linalg.inv(forward[:, :2])
    offset = -linear_inv @ forward[:, 2] - linear_inv @ np.array([0.5, 0.5]) + 0.5
    coeffs = (*linear_inv[0], offset[0], *linear_inv[1], offset[1])
    return image.transform(image.size, _AFFINE, tuple(float(c) for c in coeffs), _BILINEAR, fillcolor=fill)


def _identity(image: Image.Image) -> Image.Image:
    return image


def _brightness(image: Image.Image, factor: float) -> Image.Image:
    # Original: uint8 lookup table of value * factor, clipped then truncated.
    table = (np.arange(256, dtype=np.float32) * np.float32(factor)).clip(0, 255).astype(np.uint8)
    return image.point(table.tolist() * len(image.getbands()))


def _sharpness(image: Image.Image, factor: float) -> Image.Image:
    # Same 3x3 smoothing kernel as the original; may differ by rounding (+-1) when factor != 1.
    return image if factor == 1.0 else ImageEnhance.Sharpness(image).enhance(factor)


def _shear_x(image: Image.Image, factor: float, fill: tuple[int, int, int]) -> Image.Image:
    return _warp_affine(image, np.array([[1.0, factor, 0.0], [0.0, 1.0, 0.0]]), fill)


def _shear_y(image: Image.Image, factor: float, fill: tuple[int, int, int]) -> Image.Image:
    return _warp_affine(image, np.array([[1.0, 0.0, 0.0], [factor, 1.0, 0.0]]), fill)


def _translate_x(image: Image.Image, offset: float, fill: tuple[int, int, int]) -> Image.Image:
    # Positive offset moves content left: dst(x) = src(x + offset).
    return _warp_affine(image, np.array([[1.0, 0.0, -offset], [0.0, 1.0, 0.0]]), fill)


def _translate_y(image: Image.Image, offset: float, fill: tuple[int, int, int]) -> Image.Image:
    return _warp_affine(image, np.array([[1.0, 0.0, 0.0], [0.0, 1.0, -offset]]), fill)


def _rotate(image: Image.Image, degrees: float, fill: tuple[int, int, int]) -> Image.Image:
    # cv2.getRotationMatrix2D((W/2, H/2), degrees, 1): counter-clockwise about (W/2, H/2).
    width, height = image.size
    cx, cy = width / 2, height / 2
    cos, sin = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    forward = np.array([[cos, sin, (1 - cos) * cx - sin * cy], [-sin, cos, sin * cx + (1 - cos) * cy]])
    return _warp_affine(image, forward, fill)


_OP_FUNCS: dict[str, Callable[..., Image.Image]] = {
    "Identity": _identity,
    "AutoContrast": ImageOps.autocontrast,  # the original reimplements exactly this
    "Equalize": ImageOps.equalize,  # likewise (PIL's algorithm, not cv2's)
    "Brightness": _brightness,
    "Sharpness": _sharpness,
    "ShearX": _shear_x,
    "ShearY": _shear_y,
    "TranslateX": _translate_x,
    "TranslateY": _translate_y,
    "Rotate": _rotate,
}


def _op_args(name: str, level: float, rng: Rng) -> tuple:
    """Magnitude -> arguments, with the original's random sign draws (same comparisons)."""
    if name in ("Brightness", "Sharpness"):
        return ((level / MAX_LEVEL) * 1.8 + 0.1,)  # = 1.0, an identity, at level 5
    if name in ("ShearX", "ShearY"):
        value = (level / MAX_LEVEL) * 0.3
        return (-value if rng.random() > 0.5 else value, FILL)
    if name in ("TranslateX", "TranslateY"):
        value = (level / MAX_LEVEL) * float(TRANSLATE_CONST)
        return (-value if rng.random() > 0.5 else value, FILL)
    if name == "Rotate":
        value = (level / MAX_LEVEL) * 30
        return (-value if rng.random() < 0.5 else value, FILL)
    return ()


def apply_augment_op(image: Image.Image, name: str, level: float = 5, rng: Rng | None = None) -> Image.Image:
    """Apply one RandomAugment op unconditionally (the sign of geometric ops is random)."""
    if name not in _OP_FUNCS:
        raise ValueError(f"unknown augmentation op {name!r}; expected one of {RANDAUGMENT_OPS}")
    return _OP_FUNCS[name](image, *_op_args(name, level, random if rng is None else rng))


class RandomAugment:
    """RandomAugment of the original code: `num_ops` ops drawn with replacement from
    `ops`, each applied with probability 0.5 at magnitude `level` (of 10).

    At the BLIP setting (2, 5): shear +-0.15, translate +-5 px, rotate +-15 degrees,
    filled with grey (128, 128, 128); Brightness and Sharpness get factor 1.0 and so
    do nothing, a quirk of the original kept for fidelity.
    """

    def __init__(self, num_ops: int = 2, level: float = 5, ops: Sequence[str] = RANDAUGMENT_OPS) -> None:
        unknown = [op for op in ops if op not in _OP_FUNCS]
        if unknown:
            raise ValueError(f"unknown augmentation ops {unknown}; expected some of {RANDAUGMENT_OPS}")
        self.num_ops = num_ops
        self.level = level
        self.ops = tuple(ops)

    def __call__(self, image: Image.Image, rng: Rng | None = None) -> Image.Image:
        rng = random if rng is None else rng
        # Same draw order as the original: all op names first, then per op the
        # apply/skip coin and (for geometric ops) the sign.
        chosen = [rng.choice(self.ops) for _ in range(self.num_ops)]
        for name in chosen:
            if rng.random() > 0.5:
                continue
            image = _OP_FUNCS[name](image, *_op_args(name, self.level, rng))
        return image

    def __repr__(self) -> str:
        return f"RandomAugment(num_ops={self.num_ops}, level={self.level}, ops={list(self.ops)})"


# ----------------------------------------------------------------------------------------
# Training transform


class TrainTransform:
    """Training preprocessing of the original code (see the module docstring).

    Call as ``transform(image)`` (global `random` state) or ``transform(image, rng=rng)``.
    Picklable, for DataLoader workers.
    """

    def __init__(
        self,
        image_size: int,
        min_scale: float = 0.5,
        randaugment: bool = True,
        hflip: bool = True,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
    ) -> None:
        if not 0 < min_scale <= 1:
            raise ValueError(f"min_scale must be in (0, 1], got {min_scale}")
        self.image_size = int(image_size)
        self.scale = (float(min_scale), 1.0)
        self.ratio = (3 / 4, 4 / 3)
        self.hflip = hflip
        self.augment = RandomAugment(2, 5) if randaugment else None
        self.mean = tuple(mean)
        self.std = tuple(std)

    def __call__(self, image: Image.Image, rng: Rng | None = None) -> torch.Tensor:
        rng = random if rng is None else rng
        image = image.convert("RGB") if image.mode != "RGB" else image
        top, left, crop_h, crop_w = sample_crop_params(*image.size, self.scale, self.ratio, rng)
        image = image.crop((left, top, left + crop_w, top + crop_h))
        image = image.resize((self.image_size, self.image_size), _BICUBIC)
        if self.hflip and rng.random() < 0.5:
            image = image.transpose(_FLIP)
        if self.augment is not None:
            image = self.augment(image, rng)
        return normalize(to_tensor(image), self.mean, self.std)

    def __repr__(self) -> str:
        return (
            f"TrainTransform(image_size={self.image_size}, min_scale={self.scale[0]}, "
            f"randaugment={self.augment is not None}, hflip={self.hflip})"
        )


def train_transform(image_size: int, min_scale: float = 0.5, randaugment: bool = True, hflip: bool = True) -> TrainTransform:
    """Training transform of the original BLIP code (min_scale 0.5 downstream, 0.2 pretraining)."""
    return TrainTransform(image_size, min_scale=min_scale, randaugment=randaugment, hflip=hflip)


def batch_images(images: Sequence[Image.Image], transform: Callable[[Image.Image], torch.Tensor]) -> torch.Tensor:
    """Transform each image and stack them into a (B, 3, S, S) tensor."""
    if len(images) == 0:
        raise ValueError("batch_images: no images given")
    return torch.stack([transform(image) for image in images])
