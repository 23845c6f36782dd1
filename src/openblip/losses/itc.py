"""Image-text contrastive (ITC) loss with momentum distillation.

BLIP's ITC (reference B.1) contrasts each online feature of the local batch against a bank of
``N = B + Q`` momentum features: the momentum features of the same batch followed by a queue of
``Q`` earlier momentum features (see :class:`openblip.losses.queue.FeatureQueue`). The targets mix
the hard one-hot targets with the momentum model's own similarity distribution
(``alpha * softmax(sim_m) + (1 - alpha) * hard``). Retrieval fine-tuning (D.2) replaces the one-hot
targets by a uniform distribution over every entry with the same image id.

Shapes used throughout:
    B: local batch size; D: embedding width (256 for BLIP); N: number of contrast candidates.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["itc_loss", "itc_logits", "itc_hard_targets", "ramp_alpha"]


def itc_logits(
    image_feat: Tensor,
    text_feat: Tensor,
    image_feat_all: Tensor,
    text_feat_all: Tensor,
    temp: Tensor | float,
) -> tuple[Tensor, Tensor]:
    """Scaled cosine similarities of a batch against all contrast candidates.

    Args:
        image_feat: (B, D) L2-normalised image features.
        text_feat: (B, D) L2-normalised text features.
        image_feat_all: (N, D) image candidates for the text-to-image direction.
        text_feat_all: (N, D) text candidates for the image-to-text direction.
        temp: scalar temperature; logits are ``cosine / temp`` (BLIP learns ``temp`` directly,
            clamped to [0.001, 0.5] by the model, A.5).

    Returns:
        ``(sim_i2t, sim_t2i)``, each (B, N).
    """
    sim_i2t = image_feat @ text_feat_all.t() / temp
    sim_t2i = text_feat @ image_feat_all.t() / temp
    return sim_i2t, sim_t2i


def itc_hard_targets(
    batch_size: int,
    num_all: int,
    *,
    idx: Tensor | None = None,
    idx_all: Tensor | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Hard ITC targets: one-hot on the diagonal, or uniform over same-id entries.

    Without ids the positive of row ``i`` is column ``i``, so the first ``B`` candidates must be
    the momentum features of the same batch in the same order (pretraining, B.1). With ids, every
    column whose id equals the row's id is a positive and the row is normalised to sum to one
    (``pos_idx / pos_idx.sum(1)``, retrieval D.2).

    Args:
        batch_size: B.
        num_all: N, with N >= B.
        idx: (B,) or (B, 1) integer ids of the batch (e.g. image ids).
        idx_all: (N,) or (1, N) ids of the candidates (batch ids then the id queue).
        device: device of the result when no ids are given.
        dtype: floating dtype of the result.

    Returns:
        (B, N) rows summing to one.
    """
    if num_all < batch_size:
        raise ValueError(f"need at least as many candidates as batch entries, got N={num_all} < B={batch_size}")
    if (idx is None) != (idx_all is None):
        raise ValueError("idx and idx_all must be given together")
    if idx is None:
        targets = torch.zeros(batch_size, num_all, device=device, dtype=dtype)
        targets[:, :batch_size].fill_diagonal_(1.0)
        return targets
    idx = idx.reshape(-1, 1)
    idx_all = idx_all.reshape(1, -1)
    if idx.shape[0] != batch_size or idx_all.shape[1] != num_all:
        raise ValueError(
            f"idx {tuple(idx.shape)} / idx_all {tuple(idx_all.shape)} do not match B={batch_size}, N={num_all}"
        )
    pos = torch.eq(idx, idx_all).to(dtype)
    # Each batch id occurs in idx_all (its own momentum feature), so no row sums to zero; a
    # data-dependent check here would cost a device sync every step, so misuse shows up as NaN.
    return pos / pos.sum(1, keepdim=True)


def _soft_ce(logits: Tensor, targets: Tensor) -> Tensor:
    # Cross-entropy against a distribution, averaged over rows (blip_pretrain.py:132-133).
    return -(F.log_softmax(logits, dim=1) * targets).sum(1).mean()


def itc_loss(
    image_feat: Tensor,
    text_feat: Tensor,
    image_feat_all: Tensor,
    text_feat_all: Tensor,
    temp: Tensor | float,
    *,
    alpha: float,
    image_feat_m: Tensor | None = None,
    text_feat_m: Tensor | None = None,
    idx: Tensor | None = None,
    idx_all: Tensor | None = None,
) -> Tensor:
    """BLIP contrastive loss with momentum distillation, mean of both directions.

    Args:
        image_feat: (B, D) normalised online image features (carry gradients).
        text_feat: (B, D) normalised online text features (carry gradients).
        image_feat_all: (N, D) momentum image features of this batch followed by the image queue,
            ``N = B + Q`` (``FeatureQueue.concat`` builds it). No gradient is expected here.
        text_feat_all: (N, D) same for text.
        temp: scalar temperature (a tensor with grad is fine: gradients reach it through the
            online logits only, as in the original).
        alpha: weight of the momentum-distilled soft targets; 0 gives plain hard-target ITC.
        image_feat_m: (B, D) momentum image features of the batch; required when ``alpha > 0``.
        text_feat_m: (B, D) momentum text features of the batch; required when ``alpha > 0``.
        idx: optional (B,) ids for multi-positive targets (retrieval fine-tuning).
        idx_all: (N,) ids matching the rows of ``*_all`` (batch ids then the id queue).

    Returns:
        Scalar loss ``(loss_i2t + loss_t2i) / 2``.
    """
    batch_size, num_all = image_feat.shape[0], text_feat_all.shape[0]
    if image_feat_all.shape[0] != num_all:
        raise ValueError(f"image_feat_all has {image_feat_all.shape[0]} rows, text_feat_all {num_all}")
    sim_i2t, sim_t2i = itc_logits(image_feat, text_feat, image_feat_all, text_feat_all, temp)

    # Targets never carry gradient: the momentum model is a teacher, not a trainee.
    with torch.no_grad():
        hard = itc_hard_targets(
            batch_size, num_all, idx=idx, idx_all=idx_all, device=sim_i2t.device, dtype=sim_i2t.dtype
        )
        if alpha > 0:
            if image_feat_m is None or text_feat_m is None:
                raise ValueError("alpha > 0 needs image_feat_m and text_feat_m for the soft targets")
            sim_i2t_m, sim_t2i_m = itc_logits(image_feat_m, text_feat_m, image_feat_all, text_feat_all, temp)
            targets_i2t = alpha * F.softmax(sim_i2t_m, dim=1) + (1 - alpha) * hard
            targets_t2i = alpha * F.softmax(sim_t2i_m, dim=1) + (1 - alpha) * hard
        else:
            targets_i2t = targets_t2i = hard

    return (_soft_ce(sim_i2t, targets_i2t) + _soft_ce(sim_t2i, targets_t2i)) / 2


def ramp_alpha(alpha: float, step: int, steps_per_epoch: int, ramp_epochs: float) -> float:
    """Distillation weight ramped linearly from 0 to ``alpha`` over the first ``ramp_epochs``.

    The original ramps over 2 epochs in pretraining (pretrain.py:57-58) and over 1 epoch in
    retrieval fine-tuning (train_retrieval.py:46-49).

    Args:
        alpha: final weight (0.4 in every shipped config).
        step: global optimisation step, ``epoch * steps_per_epoch + i``.
        steps_per_epoch: iterations per epoch (``len(loader)``).
        ramp_epochs: ramp length in epochs; 0 disables the ramp.
    """
    if steps_per_epoch <= 0:
        raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
    if ramp_epochs <= 0:
        return alpha
    return alpha * min(1.0, step / (ramp_epochs * steps_per_epoch))
