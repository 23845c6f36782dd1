"""Initialise a BLIP model from unimodal checkpoints: a BERT for the text side, a ViT for images.

BLIP pre-training starts from BERT-base and a DeiT/timm ViT (reference A.3, A.1).
Cross-attention, projections and heads stay randomly initialised. Widths come
from the checkpoints themselves (:func:`text_config_from_bert`), so any BERT
size works, e.g. the 6-layer, 384-wide MiniLM.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..checkpoints.common import safe_torch_load
from ..config import TextConfig
from ..models.blip import BlipModel
from ..models.vit import resize_pos_embed


def _bert_files(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    root = Path(path)
    if not (root / "config.json").is_file():
        raise FileNotFoundError(f"{root} is not a BERT checkpoint directory (no config.json)")
    config = json.loads((root / "config.json").read_text())
    if (root / "model.safetensors").is_file():
        from safetensors.torch import load_file

        sd = load_file(str(root / "model.safetensors"))
    elif (root / "pytorch_model.bin").is_file():
        sd = safe_torch_load(root / "pytorch_model.bin")
    else:
        raise FileNotFoundError(f"{root} has neither model.safetensors nor pytorch_model.bin")
    # BertForMaskedLM / BertForPreTraining keep the encoder under "bert.".
    return config, {k.removeprefix("bert."): v for k, v in sd.items()}


def text_config_from_bert(path: str | Path, vocab_size: int = 30524) -> TextConfig:
    """Text-side widths and depths of a Hugging Face BERT checkpoint directory."""
    config, _ = _bert_files(path)
    return TextConfig(
        vocab_size=vocab_size,
        width=config["hidden_size"],
        depth=config["num_hidden_layers"],
        heads=config["num_attention_heads"],
        intermediate_size=config["intermediate_size"],
        max_position_embeddings=config["max_position_embeddings"],
        layer_norm_eps=config.get("layer_norm_eps", 1e-12),
        hidden_dropout=config.get("hidden_dropout_prob", 0.1),
        attention_dropout=config.get("attention_probs_dropout_prob", 0.1),
    )


def load_bert(model: BlipModel, path: str | Path) -> list[str]:
    """Copy BERT weights into the text encoder and decoder; returns the keys set.

    The 30,522-token embedding fills the first rows of the 30,524-token one
    ([DEC] and [ENC] keep their random rows). BERT adds token-type embedding 0 to
    every token; MED has no token types, so it is folded into the position
    embeddings, which leaves BERT's function unchanged (the original dropped it).
    An MLM head (``cls.predictions``), when present, initialises the LM head.
    """
    _, sd = _bert_files(path)
    sd = dict(sd)
    if "embeddings.token_type_embeddings.weight" in sd:
        sd["embeddings.position_embeddings.weight"] = (
            sd["embeddings.position_embeddings.weight"] + sd.pop("embeddings.token_type_embeddings.weight")[0]
        )
    targets = [m for m in (getattr(model, "text_encoder", None),) if m is not None]
    decoder = getattr(model, "text_decoder", None)
    if decoder is not None:
        targets.append(decoder.bert)
    loaded: list[str] = []
    with torch.no_grad():
        for target in targets:
            own = target.state_dict()
            for key, value in sd.items():
                if key not in own:
                    continue  # pooler, position_ids
                dst = own[key]
                if key == "embeddings.word_embeddings.weight":
                    dst[: value.shape[0]].copy_(value)
                elif dst.shape != value.shape:
                    raise ValueError(f"BERT weight {key} has shape {tuple(value.shape)}, model {tuple(dst.shape)}")
                else:
                    dst.copy_(value)
                loaded.append(key)
        if decoder is not None:
            loaded += _load_mlm_head(decoder, sd)
    if not loaded:
        raise ValueError(f"no BERT weights in {path} matched the text transformer")
    return loaded


def _load_mlm_head(decoder, sd: dict[str, torch.Tensor]) -> list[str]:
    head = decoder.cls.predictions
    names = {
        "cls.predictions.transform.dense.weight": head.transform.dense.weight,
        "cls.predictions.transform.dense.bias": head.transform.dense.bias,
        "cls.predictions.transform.LayerNorm.weight": head.transform.LayerNorm.weight,
        "cls.predictions.transform.LayerNorm.bias": head.transform.LayerNorm.bias,
    }
    done = []
    for key, param in names.items():
        if key in sd and sd[key].shape == param.shape:
            param.copy_(sd[key])
            done.append(key)
    if "cls.predictions.bias" in sd:
        head.bias[: sd["cls.predictions.bias"].shape[0]].copy_(sd["cls.predictions.bias"])
        done.append("cls.predictions.bias")
    return done


def load_vit(model: BlipModel, path: str | Path) -> list[str]:
    """Copy timm/DeiT ViT weights (``blocks.i.attn.qkv`` names) into the image encoder.

    Classification heads and DeiT's distillation token are ignored; position
    embeddings are resized to the model's image size.
    """
    sd = _vit_state_dict(Path(path))
    own = model.visual_encoder.state_dict()
    if "pos_embed" in sd:
        pos = sd["pos_embed"]
        if "dist_token" in sd:
            pos = torch.cat([pos[:, :1], pos[:, 2:]], dim=1)  # drop DeiT's distillation slot
        sd["pos_embed"] = resize_pos_embed(pos, own["pos_embed"].shape[1] - 1)
    loaded = []
    with torch.no_grad():
        for key, value in sd.items():
            if key not in own:
                continue  # head, head_dist, dist_token, fc_norm
            if own[key].shape != value.shape:
                raise ValueError(f"ViT weight {key} has shape {tuple(value.shape)}, model {tuple(own[key].shape)}")
            own[key].copy_(value)
            loaded.append(key)
    missing = sorted(set(own) - set(loaded))
    if missing:
        raise ValueError(f"ViT checkpoint {path} lacks {len(missing)} weights, e.g. {missing[:5]}")
    return loaded


def _vit_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:
        sd = safe_torch_load(path)
    sd = sd.get("model", sd) if isinstance(sd, dict) else sd
    return {k.removeprefix("module."): v for k, v in sd.items()}
