"""Image-text matching (ITM) with hard-negative mining (reference B.2, D.2).

For every text one negative image is drawn, and for every image one negative text, with
probability proportional to the ITC similarity: hard negatives are the ones the contrastive head
finds most confusing. The ITM head then sees ``[positives (B), (text, neg image) (B),
(neg text, image) (B)]`` with labels ``[1]*B + [0]*2B``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["sample_hard_negatives", "itm_loss", "itm_labels"]


def _positive_mask(batch_size: int, num_candidates: int, idx: Tensor | None, idx_all: Tensor | None,
                   device: torch.device) -> Tensor:
    """(B, M) bool, True where a candidate is a positive of the row."""
    if idx is None:
        if idx_all is not None:
            raise ValueError("idx_all needs idx")
        if num_candidates != batch_size:
            raise ValueError(
                f"without ids the similarity block must be square (B, B), got ({batch_size}, {num_candidates}); "
                "slice the in-batch block, or pass global ids as idx / idx_all"
            )
        return torch.eye(batch_size, dtype=torch.bool, device=device)
    idx = idx.reshape(-1, 1).to(device)
    idx_all = (idx if idx_all is None else idx_all).reshape(1, -1).to(device)
    if idx.shape[0] != batch_size or idx_all.shape[1] != num_candidates:
        raise ValueError(
            f"idx {tuple(idx.shape)} / idx_all {tuple(idx_all.shape)} "
            f"do not match sims ({batch_size}, {num_candidates})"
        )
    return idx == idx_all


def _negative_weights(sim: Tensor, positive: Tensor, eps: float) -> Tensor:
    """Sampling weights: softmax over all candidates (+eps), positives zeroed, never degenerate."""
    sim = sim.detach().float()
    # NaN never attracts sampling; +inf becomes the largest finite value so softmax stays finite
    # (an inf logit would make the whole row NaN).
    sim = torch.where(torch.isnan(sim), torch.full_like(sim, float("-inf")), sim)
    sim = sim.clamp(max=torch.finfo(sim.dtype).max)
    weights = F.softmax(sim, dim=1) + eps
    weights = weights.masked_fill(positive, 0.0)
    # Rows whose weights vanished (every negative underflowed to 0 with eps=0, or an all -inf row)
    # fall back to uniform over the negatives instead of making multinomial fail.
    row_sum = weights.sum(1, keepdim=True)
    degenerate = ~torch.isfinite(row_sum) | (row_sum <= 0)
    uniform = (~positive).to(weights.dtype)
    return torch.where(degenerate, uniform, weights)


@torch.no_grad()
def sample_hard_negatives(
    sim_i2t: Tensor,
    sim_t2i: Tensor,
    *,
    idx: Tensor | None = None,
    idx_all: Tensor | None = None,
    eps: float = 1e-4,
    generator: torch.Generator | None = None,
    also_positive: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Draw one hard negative per text and per image; a positive is never returned.

    The weights are ``softmax(sim) + eps`` over the candidates with every positive set to zero,
    then one index per row is drawn by ``torch.multinomial``. Positives are the diagonal without
    ids (pretraining, B.2), or every candidate sharing the row's id (retrieval, D.2; there the
    original used ``eps=0``). Rows whose weights underflow or turn non-finite sample uniformly
    among their negatives. On CPU, draws match the original's per-row ``multinomial`` loop for
    the same seed (texts first, then images).

    Args:
        sim_i2t: (B, M) image-to-text similarities of the batch images against M candidate texts.
            Pretraining passes the in-batch block ``sim_i2t[:, :B]`` (M = B).
        sim_t2i: (B, M) text-to-image similarities of the batch texts against M candidate images.
        idx: optional (B,) ids of the batch rows (e.g. image ids).
        idx_all: optional (M,) ids of the candidates when they are not the batch itself (e.g. the
            ids gathered over all ranks for global negatives); defaults to ``idx``. Without ids the
            sims must be square.
        eps: added to the softmax before masking (1e-4 in pretraining, 0 in retrieval).
        generator: optional RNG for reproducible draws (on the same device as the sims).

    Returns:
        ``(neg_image_index_per_text, neg_text_index_per_image)``: two (B,) int64 tensors of
        candidate indices in ``[0, M)``.

    Raises:
        ValueError: if there are fewer than two candidates, or some row has no negative at all
            (every candidate shares its id). Returning a positive labelled as negative would
            silently corrupt ITM training, so there is no fallback.
    """
    if sim_i2t.dim() != 2 or sim_i2t.shape != sim_t2i.shape:
        raise ValueError(f"expected two (B, M) similarity matrices, got {tuple(sim_i2t.shape)}, {tuple(sim_t2i.shape)}")
    batch_size, num_candidates = sim_i2t.shape
    if num_candidates < 2:
        raise ValueError(f"hard-negative mining needs at least 2 candidates, got {num_candidates}")
    positive = _positive_mask(batch_size, num_candidates, idx, idx_all, sim_i2t.device)
    if also_positive is not None:
        wider = positive | also_positive.to(positive.device)
        positive = torch.where(wider.all(dim=1, keepdim=True), positive, wider)
    if bool(positive.all(dim=1).any()):
        raise ValueError("some entry has no negative candidate: every candidate shares its id (in training: "
                         "every sample of the batch has the same positive_key value; use a larger batch or "
                         "a finer key)")

    weights_t2i = _negative_weights(sim_t2i, positive, eps)
    weights_i2t = _negative_weights(sim_i2t, positive, eps)
    # Order matters for reproducibility with the original: negative images (per text) first.
    neg_image_per_text = torch.multinomial(weights_t2i, 1, generator=generator).squeeze(1)
    neg_text_per_image = torch.multinomial(weights_i2t, 1, generator=generator).squeeze(1)
    return neg_image_per_text, neg_text_per_image


def itm_labels(batch_size: int, device: torch.device | str | None = None) -> Tensor:
    """ITM targets ``[1]*B + [0]*2B`` (int64, shape (3B,)); class 1 means "match"."""
    return torch.cat(
        [torch.ones(batch_size, dtype=torch.long, device=device),
         torch.zeros(2 * batch_size, dtype=torch.long, device=device)]
    )


def itm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Plain cross-entropy of the ITM head.

    Args:
        logits: (3B, 2) ITM head outputs in the order of :func:`itm_labels`.
        labels: (3B,) int64 labels.
    """
    return F.cross_entropy(logits, labels)
