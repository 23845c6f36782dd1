"""The CapFilt filter: score (image, text) pairs with ITM and ITC, keep the matching ones.

BLIP's filter is the image-grounded text encoder fine-tuned for retrieval (the COCO
retrieval checkpoint, reference C). The author's recipe (BLIP#54) keeps a pair when the
ITM head's match probability is at least 0.5, for web and synthetic texts alike; the ITC
cosine is recorded next to it for analysis but takes no part in the decision.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, TypedDict

import torch

if TYPE_CHECKING:
    from ..api import Blip

__all__ = ["DEFAULT_THRESHOLD", "PairScore", "decide", "score_texts"]

DEFAULT_THRESHOLD = 0.5  # BLIP#54: "remove all captions that have a similarity score below 0.5"
TEXT_MAX_LENGTH = 35  # retrieval text length of the original (tokens, [ENC] and [SEP] included)


class PairScore(TypedDict):
    """Scores of one (image, text) pair: ``itm`` in [0, 1], ``itc`` in [-1, 1] (None without ITC heads)."""

    itm: float
    itc: float | None


def decide(itm: float, threshold: float = DEFAULT_THRESHOLD) -> bool:
    """Keep a pair when its ITM match probability is at least ``threshold`` (ties are kept)."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold is a probability and must be in [0, 1], got {threshold}")
    return itm >= threshold


@torch.inference_mode()
def score_texts(
    filter_blip: Blip,
    pixels: torch.Tensor,
    texts_per_image: Sequence[Sequence[str]],
    *,
    first_token: str = "enc",
) -> list[list[PairScore]]:
    """Score each image against its own texts.

    Args:
        filter_blip: a model with the image-grounded encoder and ITM head (ITC is optional).
        pixels: (B, 3, S, S) images preprocessed with ``filter_blip.transform``.
        texts_per_image: B lists of texts (possibly empty); texts are used as given, so
            clean them first (``pre_caption``) as the filter saw in training.
        first_token: token put before the text for ITM; ``"enc"`` as BLIP trained the
            ITM head (the original demo and transformers use ``"cls"``, quirk L.2).

    Returns:
        B lists of ``{"itm", "itc"}`` in the order of the texts.

    Each image's cross-attention keys/values are computed once and all of its texts are
    scored in one batch against them; the unimodal text features for ITC are computed
    once for the whole batch.
    """
    if len(texts_per_image) != pixels.shape[0]:
        raise ValueError(f"{pixels.shape[0]} images but {len(texts_per_image)} text lists")
    flat = [text for texts in texts_per_image for text in texts]
    if not flat:
        return [[] for _ in texts_per_image]
    model, tokenizer = filter_blip.model, filter_blip.tokenizer
    pixels = pixels.to(filter_blip.device, filter_blip.dtype)
    image_embeds = model.encode_image(pixels)  # (B, 1+N, Dv)
    enc = tokenizer(flat, max_length=TEXT_MAX_LENGTH, first_token="cls")
    ids, mask = enc["input_ids"].to(filter_blip.device), enc["attention_mask"].to(filter_blip.device)
    itc = _itc(model, image_embeds, ids, mask, [len(t) for t in texts_per_image])
    # BLIP overwrites [CLS] with [ENC] rather than inserting a token, so lengths match.
    grounded = ids.clone()
    grounded[:, 0] = tokenizer.enc_token_id if first_token == "enc" else tokenizer.cls_token_id
    out: list[list[PairScore]] = []
    start = 0
    for i, texts in enumerate(texts_per_image):
        rows = slice(start, start + len(texts))
        start += len(texts)
        if not texts:
            out.append([])
            continue
        itm = _itm(model, image_embeds[i : i + 1], grounded[rows], mask[rows])
        out.append([{"itm": p, "itc": c} for p, c in zip(itm, itc[i] if itc else [None] * len(texts))])
    return out


def _itm(model, image_embeds: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> list[float]:
    """Match probabilities of r texts against one image (1, 1+N, Dv)."""
    width = int(mask.sum(dim=1).max())  # drop padding columns shared by all r texts
    cross_kv = model.image_cross_kv(image_embeds)
    hidden = model.encode_grounded(ids[:, :width], mask[:, :width], cross_kv=cross_kv)
    return model.itm_logits(hidden).float().softmax(dim=-1)[:, 1].tolist()


def _itc(model, image_embeds: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, counts: list[int]):
    """Per image, the cosines between its ITC feature and those of its texts; None without ITC heads."""
    if not model.cfg.has_itc:
        return None
    image_feat = model.project_image(image_embeds).float()  # (B, E)
    text_feat = model.project_text(model.encode_text(ids, mask)).float()  # (T, E)
    rows, start = [], 0
    for i, count in enumerate(counts):
        rows.append((text_feat[start : start + count] @ image_feat[i]).tolist())
        start += count
    return rows
