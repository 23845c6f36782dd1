"""Official Salesforce BLIP checkpoints (``model_base.pth``, ``model_base_retrieval_coco.pth``...).

The files hold ``{"model": state_dict, ...}`` (or a bare state dict) under the
original module names and carry no architecture description, so widths, depths,
image size and task are inferred from tensor shapes and from which parts exist.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..config import BlipConfig, TextConfig, VisionConfig
from .common import CheckpointError, StateDict, logger, safe_torch_load

# Every released BLIP tower uses 64-dim attention heads (ViT-B 768/12, ViT-L 1024/16, BERT 768/12).
HEAD_DIM = 64
# timm's ViT LayerNorm eps in the original code (transformers' configs default to 1e-5).
VIT_LAYER_NORM_EPS = 1e-6
TEXT_LAYER_NORM_EPS = 1e-12
_NLVR_MARKERS = (".crossattention.self0.", ".crossattention.self1.", "cls_head.")


def read_state_dict(path: Path) -> StateDict:
    """The state dict of an official checkpoint file, read without running pickled code."""
    obj = load_file(str(path)) if path.suffix == ".safetensors" else safe_torch_load(path)
    sd = obj.get("model", obj) if isinstance(obj, dict) else obj
    if not isinstance(sd, dict) or not sd:
        raise CheckpointError(f"{path} holds neither {{'model': state_dict}} nor a state dict")
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: state dict entries that are not tensors: {', '.join(map(str, bad[:10]))}")
    return sd


def _count(sd: StateDict, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for k in sd if (m := pattern.match(k))}
    return max(indices) + 1 if indices else 0


def _heads(width: int, part: str) -> int:
    if width % HEAD_DIM:
        raise CheckpointError(
            f"cannot infer the {part} head count: width {width} is not a multiple of {HEAD_DIM} "
            "(official BLIP models use 64-dim heads)"
        )
    return width // HEAD_DIM


def _require(sd: StateDict, key: str) -> torch.Tensor:
    if key not in sd:
        raise CheckpointError(f"not a BLIP checkpoint: no {key}")
    return sd[key]


def infer_vision(sd: StateDict) -> VisionConfig:
    width = _require(sd, "visual_encoder.cls_token").shape[-1]
    patch = _require(sd, "visual_encoder.patch_embed.proj.weight").shape[-1]
    tokens = _require(sd, "visual_encoder.pos_embed").shape[1] - 1
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise CheckpointError(f"visual_encoder.pos_embed has {tokens} patch positions, not a square grid")
    return VisionConfig(
        image_size=side * patch,
        patch_size=patch,
        width=width,
        depth=_count(sd, "visual_encoder.blocks."),
        heads=_heads(width, "vision"),
        mlp_dim=_require(sd, "visual_encoder.blocks.0.mlp.fc1.weight").shape[0],
        layer_norm_eps=VIT_LAYER_NORM_EPS,
    )


def infer_text(sd: StateDict, prefix: str) -> TextConfig:
    vocab, width = _require(sd, f"{prefix}embeddings.word_embeddings.weight").shape
    return TextConfig(
        vocab_size=vocab,
        width=width,
        depth=_count(sd, f"{prefix}encoder.layer."),
        heads=_heads(width, "text"),
        intermediate_size=_require(sd, f"{prefix}encoder.layer.0.intermediate.dense.weight").shape[0],
        max_position_embeddings=_require(sd, f"{prefix}embeddings.position_embeddings.weight").shape[0],
        layer_norm_eps=TEXT_LAYER_NORM_EPS,
    )


def _task(enc: bool, dec: bool, itc: bool, itm: bool) -> str:
    if dec and not enc and not (itc or itm):
        return "caption"
    if enc and dec:
        return "pretrain" if itc or itm else "vqa"
    if enc and not dec:
        return "retrieval" if itm else "feature"
    raise CheckpointError(
        "unrecognised BLIP layout: "
        + ", ".join(f"{n}={'yes' if f else 'no'}" for n, f in (("text_encoder", enc), ("text_decoder", dec),
                                                                ("vision_proj", itc), ("itm_head", itm)))
    )


def _shared_equal(sd: StateDict) -> bool:
    """Whether encoder and decoder hold the same tensors everywhere but self-attention (BLIP A.3)."""
    shared = [k for k in sd if k.startswith("text_encoder.") and ".attention." not in k]
    return bool(shared) and all(
        (d := "text_decoder.bert." + k[len("text_encoder."):]) in sd and torch.equal(sd[k], sd[d]) for k in shared
    )


def infer_config(sd: StateDict) -> BlipConfig:
    """The :class:`BlipConfig` an official state dict was saved from.

    Raises:
        CheckpointError: NLVR2 checkpoints (twin cross-attention, not supported yet), or
            a layout that matches no BLIP model.
    """
    if any(marker in k for k in sd for marker in _NLVR_MARKERS):
        raise CheckpointError("NLVR2 checkpoints (twin cross-attention, cls_head) are not supported yet")
    enc = any(k.startswith("text_encoder.") for k in sd)
    dec = any(k.startswith("text_decoder.") for k in sd)
    itc, itm = "vision_proj.weight" in sd, "itm_head.weight" in sd
    task = _task(enc, dec, itc, itm)
    vision = infer_vision(sd)
    text = infer_text(sd, "text_encoder." if enc else "text_decoder.bert.")
    cfg = BlipConfig(
        vision=vision, text=text, task=task, has_text_encoder=enc, has_text_decoder=dec, has_itc=itc, has_itm=itm,
    )
    if itc:
        cfg.embed_dim = sd["vision_proj.weight"].shape[0]
    if task == "vqa":
        cross_in = _require(sd, "text_decoder.bert.encoder.layer.0.crossattention.self.key.weight").shape[1]
        if cross_in != text.width:
            raise CheckpointError(
                f"encoder+decoder checkpoint without heads, but the decoder cross-attends to {cross_in}-wide "
                f"states, not to the {text.width}-wide question encoder: not a VQA layout"
            )
        cfg.decoder_cross = "question"
    if task == "pretrain":
        cfg.tie_encoder_decoder = _shared_equal(sd)
        logger.debug("pre-trained checkpoint, encoder/decoder tied: %s", cfg.tie_encoder_decoder)
    return cfg
