"""Typed configuration of a BLIP model, named presets, and (de)serialisation.

A :class:`BlipConfig` describes the widths and depths of the two towers and which
parts a checkpoint carries (unimodal/image-grounded text encoder, image-grounded
decoder, ITC projections, ITM head). Presets live as JSON files in
``openblip/presets`` so that a new size is a data file, not code.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

PRESET_PACKAGE = "openblip.presets"


def _part(cls, data: dict[str, Any], name: str):
    """``cls(**data)``, with unknown fields named in a ValueError instead of a TypeError."""
    unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"unknown {name} config fields: {sorted(unknown)}; known: "
                         f"{sorted(f.name for f in dataclasses.fields(cls))}")
    return cls(**data)


@dataclass
class VisionConfig:
    """ViT image encoder (pre-norm, fused qkv with bias, learned absolute positions)."""

    image_size: int = 384
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    # The original BLIP ViT uses 1e-6; transformers' BLIP configs default to 1e-5.
    layer_norm_eps: float = 1e-6
    drop_path_rate: float = 0.0

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class TextConfig:
    """BERT-style MED text transformer (post-norm, no token types)."""

    vocab_size: int = 30524
    width: int = 768
    depth: int = 12
    heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    pad_token_id: int = 0


@dataclass
class BlipConfig:
    """Which parts a BLIP model has and how they are shaped.

    ``task`` names the face the weights were trained for: ``pretrain`` (all parts),
    ``caption`` (ViT + decoder), ``retrieval`` (ViT + encoder + ITC/ITM heads),
    ``vqa`` (ViT + question encoder + answer decoder that cross-attends to the
    question), ``feature`` (ViT + encoder + projections).
    """

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 256
    task: str = "pretrain"
    has_text_encoder: bool = True
    has_text_decoder: bool = True
    has_itc: bool = True
    has_itm: bool = True
    # Decoder cross-attention source: "image" (captioning, LM) or "question" (VQA).
    decoder_cross: str = "image"
    # First token of image-grounded text (ITM, VQA question). BLIP trained with
    # [ENC]; transformers' BLIP (and the original BLIP_ITM demo class) use [CLS].
    grounded_first_token: str = "enc"
    prompt: str = "a picture of "
    # Encoder and decoder share all weights but self-attention (pre-training).
    tie_encoder_decoder: bool = False
    # Extra entries preserved verbatim (e.g. where the weights came from).
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.vision, dict):
            self.vision = _part(VisionConfig, self.vision, "vision")
        if isinstance(self.text, dict):
            self.text = _part(TextConfig, self.text, "text")
        for name, part, cls in (("vision", self.vision, VisionConfig), ("text", self.text, TextConfig)):
            if not isinstance(part, cls):
                raise ValueError(f"{name} must be an object of {cls.__name__} fields, got {part!r}")
        sizes = {"embed_dim": self.embed_dim, **{f"{name}.{key}": getattr(part, key) for name, part in
                 (("vision", self.vision), ("text", self.text)) for key in ("width", "depth", "heads")}}
        bad = {key: value for key, value in sizes.items() if not isinstance(value, int) or value < 1}
        if bad:
            raise ValueError(f"model sizes must be positive integers, got {bad}")
        if self.decoder_cross not in ("image", "question"):
            raise ValueError(f"decoder_cross must be 'image' or 'question', got {self.decoder_cross!r}")
        if self.grounded_first_token not in ("enc", "cls"):
            raise ValueError(f"grounded_first_token must be 'enc' or 'cls', got {self.grounded_first_token!r}")
        for part in (self.vision, self.text):
            if part.width % part.heads:
                raise ValueError(f"width {part.width} is not divisible by heads {part.heads}")
        if self.vision.image_size % self.vision.patch_size:
            raise ValueError(
                f"image_size {self.vision.image_size} is not a multiple of patch_size {self.vision.patch_size}"
            )

    @property
    def decoder_cross_width(self) -> int:
        return self.text.width if self.decoder_cross == "question" else self.vision.width

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BlipConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown BlipConfig fields: {sorted(unknown)}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "BlipConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


def list_presets() -> list[str]:
    """Names of the bundled presets (``tiny``, ``base``, ``large``, ...)."""
    files = resources.files(PRESET_PACKAGE).iterdir()
    return sorted(f.name[: -len(".json")] for f in files if f.name.endswith(".json"))


def preset(name: str, **overrides: Any) -> BlipConfig:
    """Load a named preset; ``overrides`` replace top-level fields, and
    ``vision``/``text`` dicts are merged field by field."""
    if name not in list_presets():
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(list_presets())}")
    data = json.loads(resources.files(PRESET_PACKAGE).joinpath(f"{name}.json").read_text())
    for key, value in overrides.items():
        if key in ("vision", "text") and isinstance(value, dict):
            data[key] = {**data.get(key, {}), **value}
        else:
            data[key] = value
    return BlipConfig.from_dict(data)
