"""Language-modelling (LM) loss of the image-grounded decoder (reference A.2, B.3, D.1, D.3)."""
from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor

__all__ = ["lm_loss", "mask_prompt_and_padding", "scored_positions", "IGNORE_INDEX"]

# Label value excluded from the loss (PyTorch's default ignore_index, used by the original).
IGNORE_INDEX = -100


def lm_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    label_smoothing: float = 0.1,
    reduction: Literal["mean", "none", "sum"] = "mean",
) -> Tensor:
    """Next-token cross-entropy with label smoothing, as BLIP's decoder computes it (med.py:909-917).

    Position ``t`` of ``logits`` predicts ``labels[:, t + 1]``; labels equal to -100 are ignored.
    The smoothing of 0.1 is what the original hard-codes everywhere, including VQA answer
    ranking (quirk L.4).

    Args:
        logits: (B, L, V) decoder outputs.
        labels: (B, L) token ids, -100 where no loss is wanted (padding, prompt).
        label_smoothing: weight of the uniform distribution mixed into the targets.
        reduction: "mean" over all non-ignored tokens of the batch; "sum" over them; "none"
            returns the per-sequence sum, shape (B,) (the form VQA training and ranking use).

    Returns:
        A scalar, or (B,) for ``reduction="none"``.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"expected logits (B, L, V) and labels (B, L), got {tuple(logits.shape)}, {tuple(labels.shape)}"
        )
    if reduction not in ("mean", "none", "sum"):
        raise ValueError(f"unknown reduction {reduction!r}")
    batch_size, _, vocab = logits.shape
    shifted = logits[:, :-1].reshape(-1, vocab)
    targets = labels[:, 1:].reshape(-1)
    loss = F.cross_entropy(
        shifted, targets, ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing, reduction=reduction
    )
    if reduction == "none":
        # Ignored positions come back as 0, so the row sum is the sequence's loss.
        loss = loss.view(batch_size, -1).sum(1)
    return loss


def mask_prompt_and_padding(input_ids: Tensor, attention_mask: Tensor, prompt_length: int = 0) -> Tensor:
    """Decoder labels: the ids with padding and the first ``prompt_length`` positions set to -100.

    Captioning (D.1) trains only on the caption after the prompt ``[DEC] a picture of`` (4
    tokens); pretraining (B.3) uses ``prompt_length=0`` and masks padding only.

    Args:
        input_ids: (B, L) decoder input ids.
        attention_mask: (B, L), 0 at padding.
        prompt_length: number of leading positions excluded from the loss.

    Returns:
        (B, L) int64 labels (a new tensor; ``input_ids`` is left untouched).
    """
    if input_ids.shape != attention_mask.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} differ")
    if prompt_length < 0:
        raise ValueError(f"prompt_length must be >= 0, got {prompt_length}")
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    labels[:, :prompt_length] = IGNORE_INDEX
    return labels


def scored_positions(hidden: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Hidden states that predict a label, and those labels: ``(N, D)``, ``(N,)``.

    Position ``t`` predicts ``labels[:, t + 1]``; positions whose target is -100
    (padding, prompt) are dropped. Applying the LM head to these rows only and
    taking a mean cross-entropy gives exactly ``lm_loss(head(hidden), labels)``
    while skipping the vocabulary projection of every padded position.
    """
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    return hidden[:, :-1][keep], targets[keep]
