"""The Hugging Face transformers BLIP format: ``config.json`` + ``model.safetensors``
(or ``pytorch_model.bin``) + tokenizer files.

transformers renamed only the vision tower when it converted the official
checkpoints (reference E.3); text encoder, decoder and heads keep their names.
Nothing here imports transformers: the format is read and written from its files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from ..config import BlipConfig, TextConfig, VisionConfig
from ..models.blip import BlipModel
from ..tokenizer import BlipTokenizer
from .common import (
    TASK_PARTS,
    CheckpointError,
    StateDict,
    atomic_directory,
    logger,
    safe_torch_load,
    unique_state_dict,
)

HF_TASKS = {
    "BlipForConditionalGeneration": "caption",
    "BlipForImageTextRetrieval": "retrieval",
    "BlipForQuestionAnswering": "vqa",
}
HF_ARCHITECTURE = {task: arch for arch, task in HF_TASKS.items()}

# Exact vision names, ours -> transformers.
_VISION_NAMES = {
    "visual_encoder.cls_token": "vision_model.embeddings.class_embedding",
    "visual_encoder.pos_embed": "vision_model.embeddings.position_embedding",
}
# Vision prefixes, ours -> transformers (longest first).
_VISION_PREFIXES = (
    ("visual_encoder.patch_embed.proj.", "vision_model.embeddings.patch_embedding."),
    ("visual_encoder.norm.", "vision_model.post_layernorm."),
)
_BLOCKS = ("visual_encoder.blocks.", "vision_model.encoder.layers.")
# Inside one ViT block, ours -> transformers.
_BLOCK_PREFIXES = (
    ("attn.qkv.", "self_attn.qkv."),
    ("attn.proj.", "self_attn.projection."),
    ("norm1.", "layer_norm1."),
    ("norm2.", "layer_norm2."),
    ("mlp.", "mlp."),
)

# transformers' defaults for fields a config.json may omit (BlipVisionConfig /
# BlipTextConfig, 5.24): note 8 text heads and the vision LayerNorm eps of 1e-5.
_HF_VISION_DEFAULTS = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    image_size=384, patch_size=16, layer_norm_eps=1e-5, hidden_act="gelu",
)
_HF_TEXT_DEFAULTS = dict(
    vocab_size=30524, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=8,
    max_position_embeddings=512, layer_norm_eps=1e-12, hidden_act="gelu", pad_token_id=0,
)
# In order of preference.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# CLIP image statistics used by BLIP (BlipImageProcessor defaults).
_IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
_IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]


def _swap_prefix(key: str, pairs: tuple[tuple[str, str], ...], reverse: bool) -> str | None:
    for ours, theirs in pairs:
        src, dst = (theirs, ours) if reverse else (ours, theirs)
        if key.startswith(src):
            return dst + key[len(src) :]
    return None


def _rename(key: str, reverse: bool) -> str:
    names = {v: k for k, v in _VISION_NAMES.items()} if reverse else _VISION_NAMES
    if key in names:
        return names[key]
    swapped = _swap_prefix(key, _VISION_PREFIXES, reverse)
    if swapped is not None:
        return swapped
    src, dst = (_BLOCKS[1], _BLOCKS[0]) if reverse else _BLOCKS
    if key.startswith(src):
        index, _, rest = key[len(src) :].partition(".")
        inner = _swap_prefix(rest, _BLOCK_PREFIXES, reverse)
        return f"{dst}{index}.{inner if inner is not None else rest}"
    return key  # text encoder, decoder and heads share their names


def hf_key_to_ours(key: str) -> str:
    """``vision_model.encoder.layers.0.self_attn.projection.weight`` -> ``visual_encoder.blocks.0.attn.proj.weight``."""
    return _rename(key, reverse=True)


def our_key_to_hf(key: str) -> str:
    """The inverse of :func:`hf_key_to_ours`."""
    return _rename(key, reverse=False)


def is_hf_dir(directory: Path) -> bool:
    path = directory / "config.json"
    if not path.is_file():
        return False
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    archs = data.get("architectures") or []
    return data.get("model_type") == "blip" or any(str(a).startswith("Blip") for a in archs)


def config_from_hf(data: dict[str, Any]) -> tuple[BlipConfig, str, str]:
    """``(BlipConfig, task, architecture)`` for a transformers BLIP ``config.json``."""
    archs = data.get("architectures") or []
    known = [a for a in archs if a in HF_TASKS]
    if not known:
        raise CheckpointError(
            f"config.json architectures {archs} name no supported BLIP class ({', '.join(HF_TASKS)})"
        )
    arch = known[0]
    v = {**_HF_VISION_DEFAULTS, **(data.get("vision_config") or {})}
    t = {**_HF_TEXT_DEFAULTS, **(data.get("text_config") or {})}
    for part, act in (("vision", v["hidden_act"]), ("text", t["hidden_act"])):
        if act != "gelu":
            raise CheckpointError(f"{part} hidden_act {act!r} is not supported (BLIP uses exact 'gelu')")
    vision = VisionConfig(
        image_size=v["image_size"], patch_size=v["patch_size"], width=v["hidden_size"], depth=v["num_hidden_layers"],
        heads=v["num_attention_heads"], mlp_dim=v["intermediate_size"], layer_norm_eps=v["layer_norm_eps"],
    )
    text = TextConfig(
        vocab_size=t["vocab_size"], width=t["hidden_size"], depth=t["num_hidden_layers"],
        heads=t["num_attention_heads"], intermediate_size=t["intermediate_size"],
        max_position_embeddings=t["max_position_embeddings"], layer_norm_eps=t["layer_norm_eps"],
        pad_token_id=t["pad_token_id"] if t["pad_token_id"] is not None else 0,
    )
    task = HF_TASKS[arch]
    cfg = BlipConfig(vision=vision, text=text, embed_dim=data.get("image_text_hidden_size", 256), task=task)
    for name, value in TASK_PARTS[task].items():
        setattr(cfg, name, value)
    return cfg, task, arch


def config_to_hf(cfg: BlipConfig) -> dict[str, Any]:
    """A transformers ``config.json`` for ``cfg`` (caption, retrieval or VQA)."""
    v, t = cfg.vision, cfg.text
    return {
        "architectures": [HF_ARCHITECTURE[cfg.task]],
        "model_type": "blip",
        "image_text_hidden_size": cfg.embed_dim,
        "tie_word_embeddings": True,
        "dtype": "float32",
        "vision_config": {
            "model_type": "blip_vision_model", "hidden_size": v.width, "intermediate_size": v.mlp_dim,
            "num_hidden_layers": v.depth, "num_attention_heads": v.heads, "image_size": v.image_size,
            "patch_size": v.patch_size, "hidden_act": "gelu", "attention_dropout": 0.0,
            # Written explicitly: transformers' default (1e-5) differs from BLIP's 1e-6.
            "layer_norm_eps": v.layer_norm_eps,
        },
        "text_config": {
            "model_type": "blip_text_model", "vocab_size": t.vocab_size, "hidden_size": t.width,
            "encoder_hidden_size": v.width, "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.depth, "num_attention_heads": t.heads,
            "max_position_embeddings": t.max_position_embeddings, "layer_norm_eps": t.layer_norm_eps,
            "hidden_act": "gelu", "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
            "is_decoder": True, "use_cache": True, "tie_word_embeddings": True, "label_smoothing": 0.0,
            "pad_token_id": t.pad_token_id, "bos_token_id": 30522, "sep_token_id": 102, "eos_token_id": 2,
        },
    }


def _weight_paths(directory: Path) -> list[Path]:
    for name in WEIGHT_FILES:
        path = directory / name
        if not path.is_file():
            continue
        if name.endswith(".index.json"):
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
            return [directory / s for s in shards]
        return [path]
    raise CheckpointError(f"{directory} has none of the weight files {', '.join(WEIGHT_FILES)}")


def read_weights(directory: Path) -> StateDict:
    """All tensors of a transformers model directory (safetensors preferred, sharded or not)."""
    sd: StateDict = {}
    for path in _weight_paths(directory):
        if path.suffix == ".safetensors":
            sd.update(load_file(path))
        else:
            sd.update(safe_torch_load(path))
    return sd


def read_hf_dir(directory: Path) -> tuple[BlipConfig, StateDict, str]:
    """``(config, state dict under our names, architecture)`` of a transformers BLIP directory."""
    cfg, task, arch = config_from_hf(json.loads((directory / "config.json").read_text()))
    if task == "vqa" and cfg.vision.width != cfg.text.width:
        raise CheckpointError(
            f"a VQA model needs equal vision and text widths (got {cfg.vision.width} and {cfg.text.width}): "
            "its answer decoder cross-attends to the question encoder"
        )
    sd = {hf_key_to_ours(k): v for k, v in read_weights(directory).items()}
    return cfg, sd, arch


def load_tokenizer(directory: Path) -> BlipTokenizer:
    """The directory's tokenizer, or BLIP's default one when it ships none."""
    if (directory / "vocab.txt").is_file() or (directory / "tokenizer.json").is_file():
        return BlipTokenizer.from_pretrained(directory)
    logger.info("%s has no tokenizer files; using the bert-base-uncased BLIP tokenizer", directory)
    return BlipTokenizer.default()


def write_hf_dir(model: BlipModel, tokenizer: BlipTokenizer, directory: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``model`` as a directory that ``transformers`` loads with its BLIP class."""
    cfg = model.cfg
    if cfg.task not in HF_ARCHITECTURE:
        raise CheckpointError(
            f"transformers has no class for a {cfg.task!r} model; pick the parts of one task with "
            f"task='caption'|'retrieval'|'vqa' (CLI: --task) or convert to the openblip format"
        )
    if cfg.task == "vqa" and cfg.vision.width != cfg.text.width:
        raise CheckpointError("transformers' BlipForQuestionAnswering needs equal vision and text widths")
    sd, _ = unique_state_dict(model)
    if "temp" in sd:
        logger.info("transformers' BLIP has no ITC temperature; dropping temp=%.4f", sd["temp"].item())
        del sd["temp"]
    sd = {our_key_to_hf(k): v.float() for k, v in sd.items()}
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(config_to_hf(cfg), indent=2) + "\n")
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        (tmp / "preprocessor_config.json").write_text(json.dumps(_preprocessor_config(cfg), indent=2) + "\n")
    return Path(directory)


def _preprocessor_config(cfg: BlipConfig) -> dict[str, Any]:
    size = cfg.vision.image_size
    return {
        "image_processor_type": "BlipImageProcessor", "processor_class": "BlipProcessor",
        "do_resize": True, "size": {"height": size, "width": size}, "resample": 3,
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": _IMAGE_MEAN, "image_std": _IMAGE_STD, "do_convert_rgb": True,
    }


__all__ = [
    "HF_ARCHITECTURE",
    "HF_TASKS",
    "config_from_hf",
    "config_to_hf",
    "hf_key_to_ours",
    "our_key_to_hf",
    "read_hf_dir",
    "write_hf_dir",
]
