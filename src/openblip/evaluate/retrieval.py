"""Image-text retrieval evaluation as in BLIP (train_retrieval.py:68-215, reference D.2).

Two stages:

1. ITC: every image and text is embedded once; ``sims = image_feat @ text_feat.T`` is the
   unscaled cosine similarity of the projected, normalised features.
2. ITM re-ranking: for each image its top-``k_test`` texts, and for each text its
   top-``k_test`` images, are scored by the ITM head. The final score of such a pair is
   ``itm_logit[:, 1] + cosine`` (the pre-softmax "match" logit); every other entry is -100.

Work is grouped per image: an image is encoded once, its cross-attention keys/values are
computed once, and every text that needs it (its own top-k texts plus the texts that put it
in their top-k) is scored in batches against those keys/values without copying them.
A pair selected in both directions is scored once and written to both matrices.

`recall_at_k` turns the two score matrices into Recall@1/5/10 exactly as ``itm_eval``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from ..api import Blip
from ..images import load_image
from ..models.blip import BlipModel
from ..tokenizer import BlipTokenizer
from ..transforms import eval_transform

TEXT_MAX_LENGTH = 35  # retrieval text length of the original evaluation
NOT_RANKED = -100.0  # score of pairs outside the top-k, as the original


class _Images(Dataset):
    """Eval-transformed pixels from paths, bytes, PIL images, ``(3,S,S)`` tensors, or the
    ``(tensor, index)`` items of `openblip.data.annotations.RetrievalEvalSet`."""

    def __init__(self, items: Sequence[Any], transform) -> None:
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> torch.Tensor:
        item = self.items[i]
        if isinstance(item, tuple):
            item = item[0]
        if isinstance(item, torch.Tensor):
            return item
        return self.transform(load_image(item))


def _unpack(blip: Blip | BlipModel, tokenizer: BlipTokenizer | None):
    if isinstance(blip, Blip):
        return blip.model, tokenizer or blip.tokenizer, blip.transform
    return blip, tokenizer or BlipTokenizer.default(), eval_transform(blip.cfg.vision.image_size)


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _trim(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop padding columns no row uses: the result is unchanged, the work shrinks."""
    width = int(mask.sum(1).max())
    return ids[:, :width], mask[:, :width]


def _encode_texts(model: BlipModel, tokenizer: BlipTokenizer, texts: Sequence[str], first_token: str,
                  batch_size: int, max_length: int, device: torch.device):
    """Grounded-encoder ids ``(Nt, L)`` and mask, and ITC features ``(Nt, E)``."""
    enc = tokenizer(list(texts), max_length=max_length, padding="max_length", first_token="cls")
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    feats = []
    for start in range(0, len(texts), batch_size):
        chunk_ids, chunk_mask = _trim(ids[start : start + batch_size], mask[start : start + batch_size])
        feats.append(model.project_text(model.encode_text(chunk_ids, chunk_mask)).float())
    grounded = ids.clone()
    # The ITM head was trained on [ENC]-prefixed text (original retrieval; quirk L.2 for "cls").
    grounded[:, 0] = tokenizer.enc_token_id if first_token == "enc" else tokenizer.cls_token_id
    return grounded, mask, torch.cat(feats)


def _encode_images(model: BlipModel, images, transform, batch_size: int, num_workers: int,
                   progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Image tokens ``(Ni, N, Dv)`` kept on the CPU, and ITC features ``(Ni, E)`` on the device."""
    param = next(model.parameters())
    items = images if isinstance(images, torch.Tensor) else _Images(images, transform)
    loader = DataLoader(items, batch_size=batch_size, num_workers=num_workers)
    store: torch.Tensor | None = None
    feats, start = [], 0
    for pixels in _progress(loader, progress, "images"):
        embeds = model.encode_image(pixels.to(param.device, param.dtype))
        if store is None:  # allocate once: avoids holding two copies while concatenating
            store = torch.empty((len(items), *embeds.shape[1:]), dtype=embeds.dtype)
        store[start : start + len(embeds)] = embeds.cpu()
        feats.append(model.project_image(embeds).float())
        start += len(embeds)
    return store, torch.cat(feats)


def _progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc)


def _selectors(t2i_idx: torch.Tensor, num_images: int) -> list[torch.Tensor]:
    """For each image, the texts that ranked it in their top-k (from ``t2i_idx`` (Nt, k))."""
    num_texts, k = t2i_idx.shape
    images = t2i_idx.reshape(-1)
    texts = torch.arange(num_texts, device=t2i_idx.device).repeat_interleave(k)
    order = torch.argsort(images, stable=True)
    counts = torch.bincount(images, minlength=num_images).tolist()
    return list(torch.split(texts[order], counts))


def _itm_logits(model: BlipModel, ids: torch.Tensor, mask: torch.Tensor, cross_kv, batch_size: int) -> torch.Tensor:
    """ITM "match" logits ``(T,)`` of T texts against one image's keys/values (batch 1)."""
    out = []
    for start in range(0, len(ids), batch_size):
        chunk_ids, chunk_mask = _trim(ids[start : start + batch_size], mask[start : start + batch_size])
        grounded = model.encode_grounded(chunk_ids, chunk_mask, cross_kv=cross_kv)
        out.append(model.itm_logits(grounded)[:, 1].float())
    return torch.cat(out)


def _keep_topk(scores: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``NOT_RANKED`` everywhere except the re-ranked entries ``idx`` of each row."""
    return torch.full_like(scores, NOT_RANKED).scatter_(1, idx, scores.gather(1, idx))


@torch.inference_mode()
def retrieval_scores(
    blip: Blip | BlipModel,
    images: Sequence[Any] | torch.Tensor,
    texts: Sequence[str],
    *,
    tokenizer: BlipTokenizer | None = None,
    k_test: int = 256,
    batch_size: int = 64,
    text_batch_size: int = 256,
    itm_batch_size: int = 256,
    first_token: str = "enc",
    max_length: int = TEXT_MAX_LENGTH,
    num_workers: int = 0,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Retrieval score matrices of BLIP's evaluation: ITC top-k, re-ranked by ITM.

    Args:
        blip: an `openblip.Blip`, or a `BlipModel` (then ``tokenizer`` defaults to
            ``BlipTokenizer.default()`` and images get the eval transform of its size).
        images: ``Ni`` images: paths, bytes, PIL images, preprocessed ``(3,S,S)`` tensors,
            a ``(Ni,3,S,S)`` tensor, or a dataset of ``(tensor, index)`` items.
        texts: ``Nt`` captions, used as given (the original cleaned them with ``pre_caption``).
        k_test: texts per image and images per text re-ranked by ITM (256 COCO, 128 Flickr);
            capped at the number of candidates.
        batch_size: images per ViT forward.
        text_batch_size: texts per unimodal text-encoder forward.
        itm_batch_size: texts per grounded-encoder forward against one image.
        first_token: "enc" (BLIP training) or "cls" at position 0 of the ITM text.
        max_length: token length texts are truncated to (35 in the original).
        num_workers: image-loading workers.
        progress: show tqdm bars.

    Returns:
        ``(score_i2t (Ni, Nt), score_t2i (Nt, Ni))`` float32 CPU tensors: ITM logit + cosine for
        re-ranked pairs, -100 elsewhere.

    Memory: all image tokens are kept on the CPU, ``Ni * (1 + (S/P)^2) * Dv`` values in the
    model dtype (COCO 5k test at 384 px, ViT-B: 5000 * 577 * 768 * 4 B = 8.9 GB in fp32, half
    in bf16), as the original; the ``(Ni, Nt)`` similarity and score matrices stay on the device.

    With ``torch.distributed`` initialised, image rows are split across ranks and the score
    matrices summed (all ranks must call this with the same inputs).
    """
    if first_token not in ("enc", "cls"):
        raise ValueError(f"first_token must be 'enc' or 'cls', got {first_token!r}")
    model, tokenizer, transform = _unpack(blip, tokenizer)
    device = next(model.parameters()).device
    ids, mask, text_feat = _encode_texts(model, tokenizer, texts, first_token, text_batch_size, max_length, device)
    image_embeds, image_feat = _encode_images(model, images, transform, batch_size, num_workers, progress)
    sims = image_feat @ text_feat.T  # (Ni, Nt) unscaled cosine
    num_images, num_texts = sims.shape
    i2t_sim, i2t_idx = sims.topk(min(k_test, num_texts), dim=1)  # (Ni, k)
    t2i_idx = sims.T.topk(min(k_test, num_images), dim=1).indices  # (Nt, k)
    selectors = _selectors(t2i_idx, num_images)

    score_i2t, score_t2i = torch.zeros_like(sims), torch.zeros_like(sims.T)
    rank, world = _rank_world()
    step = math.ceil(num_images / world)
    rows = range(rank * step, min(num_images, (rank + 1) * step))
    for i in _progress(rows, progress, "ITM re-rank"):
        cross_kv = model.image_cross_kv(image_embeds[i : i + 1].to(device))
        k = i2t_idx.shape[1]
        # One pass over the union of this image's top-k texts and the texts that chose it.
        union, where = torch.unique(torch.cat([i2t_idx[i], selectors[i]]), return_inverse=True)
        itm = _itm_logits(model, ids[union], mask[union], cross_kv, itm_batch_size)
        score_i2t[i, i2t_idx[i]] = itm[where[:k]] + i2t_sim[i]
        score_t2i[selectors[i], i] = itm[where[k:]] + sims[i, selectors[i]]
    if world > 1:
        dist.all_reduce(score_i2t)
        dist.all_reduce(score_t2i)
    return _keep_topk(score_i2t, i2t_idx).cpu(), _keep_topk(score_t2i, t2i_idx).cpu()


def _ranks(scores: np.ndarray, targets: Sequence[Sequence[int]]) -> np.ndarray:
    """Best 0-based rank of any target per row, with the original's ``argsort[::-1]`` order."""
    out = np.zeros(len(scores))
    for row, score in enumerate(scores):
        order = np.argsort(score)[::-1]
        position = np.empty_like(order)
        position[order] = np.arange(len(order))
        out[row] = min(position[t] for t in targets[row])
    return out


def _as_rows(mapping: Mapping[int, Any] | Sequence[Any], n: int) -> list[Any]:
    return [mapping[i] for i in range(n)]


def _recalls(ranks: np.ndarray) -> tuple[float, float, float]:
    return tuple(100.0 * float(np.mean(ranks < k)) for k in (1, 5, 10))  # type: ignore[return-value]


def recall_at_k(
    score_i2t: torch.Tensor | np.ndarray,
    score_t2i: torch.Tensor | np.ndarray,
    img2txt: Mapping[int, Sequence[int]] | Sequence[Sequence[int]],
    txt2img: Mapping[int, int] | Sequence[int],
) -> dict[str, float]:
    """Recall@1/5/10 in percent, as the original ``itm_eval``.

    Args:
        score_i2t: ``(Ni, Nt)`` scores of every text for each image.
        score_t2i: ``(Nt, Ni)`` scores of every image for each text.
        img2txt: for image ``i``, the indices of its ground-truth texts.
        txt2img: for text ``t``, the index of its image.

    Returns:
        ``txt_r1 txt_r5 txt_r10`` (image -> text: an image counts when its best-ranked
        ground-truth text is within k), ``img_r1 img_r5 img_r10`` (text -> image), their means
        ``txt_r_mean img_r_mean`` and ``r_mean`` = (txt_r_mean + img_r_mean) / 2; plain floats.
    """
    i2t = np.asarray(score_i2t.float().cpu() if isinstance(score_i2t, torch.Tensor) else score_i2t)
    t2i = np.asarray(score_t2i.float().cpu() if isinstance(score_t2i, torch.Tensor) else score_t2i)
    if i2t.shape != t2i.shape[::-1]:
        raise ValueError(f"score_i2t {i2t.shape} and score_t2i {t2i.shape} are not transposes in shape")
    tr1, tr5, tr10 = _recalls(_ranks(i2t, _as_rows(img2txt, i2t.shape[0])))
    ir1, ir5, ir10 = _recalls(_ranks(t2i, [[j] for j in _as_rows(txt2img, t2i.shape[0])]))
    tr_mean, ir_mean = (tr1 + tr5 + tr10) / 3, (ir1 + ir5 + ir10) / 3
    return {
        "txt_r1": tr1, "txt_r5": tr5, "txt_r10": tr10, "txt_r_mean": tr_mean,
        "img_r1": ir1, "img_r5": ir5, "img_r10": ir10, "img_r_mean": ir_mean,
        "r_mean": (tr_mean + ir_mean) / 2,
    }
