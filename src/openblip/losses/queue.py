"""Momentum feature queue and momentum-encoder updates for ITC (reference B.1, D.2).

The queue stores the momentum features of the last ``Q`` training samples (57,600 in every
shipped config) so that ITC sees far more negatives than one batch holds. Features are stored
column-wise, ``(D, Q)``, as in the original, which keeps checkpoint tensors interchangeable.

Deviation from the original: ``_dequeue_and_enqueue`` asserted ``Q % global_batch == 0``
(blip_pretrain.py:262). Here a write that runs past the end wraps around to the start of the
buffer, so any queue size works with any batch size (and with a smaller final batch). When ``Q``
is a multiple of the batch the buffer contents are identical to the original's.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FeatureQueue", "QueueFeatures", "momentum_update", "copy_params"]

# Id of an empty queue slot (blip_retrieval.py:59); never equal to a real (non-negative) image id.
EMPTY_IDX = -100


class QueueFeatures(NamedTuple):
    """Snapshot of a :class:`FeatureQueue`: image (D, Q), text (D, Q), idx (1, Q) or None."""

    image: Tensor
    text: Tensor
    idx: Tensor | None


class FeatureQueue(nn.Module):
    """FIFO bank of normalised image and text features, with optional sample ids.

    Buffers (all persistent, so ``state_dict`` restores the queue exactly):
        image_queue: (D, Q) float.
        text_queue: (D, Q) float.
        idx_queue: (1, Q) int64, only when ``with_idx``; empty slots hold -100.
        ptr: (1,) int64, next slot to write.

    Args:
        dim: feature width D (BLIP: 256).
        size: number of slots Q.
        with_idx: also keep the ids used for multi-positive retrieval targets.
    """

    def __init__(self, dim: int, size: int, *, with_idx: bool = False) -> None:
        super().__init__()
        if dim <= 0 or size <= 0:
            raise ValueError(f"dim and size must be positive, got dim={dim}, size={size}")
        # Same draws, in the same order, as the original: randn image, randn text, then normalise
        # each column; the global torch RNG decides the values.
        image_queue = torch.randn(dim, size)
        text_queue = torch.randn(dim, size)
        self.register_buffer("image_queue", F.normalize(image_queue, dim=0))
        self.register_buffer("text_queue", F.normalize(text_queue, dim=0))
        if with_idx:
            self.register_buffer("idx_queue", torch.full((1, size), EMPTY_IDX, dtype=torch.long))
        else:
            self.register_buffer("idx_queue", None)
        self.register_buffer("ptr", torch.zeros(1, dtype=torch.long))

    @property
    def dim(self) -> int:
        return self.image_queue.shape[0]

    @property
    def size(self) -> int:
        return self.image_queue.shape[1]

    @property
    def with_idx(self) -> bool:
        return self.idx_queue is not None

    def extra_repr(self) -> str:
        return f"dim={self.dim}, size={self.size}, with_idx={self.with_idx}"

    @torch.no_grad()
    def enqueue(self, image_feat: Tensor, text_feat: Tensor, idx: Tensor | None = None) -> None:
        """Write a batch of features at ``ptr`` and advance it, wrapping around the end.

        Pass the batch already gathered over all ranks (``distributed.all_gather``) so every rank
        keeps the same queue. If the batch is larger than the queue only its last ``Q`` entries
        survive, exactly as if it had been written in order.

        Args:
            image_feat: (G, D) momentum image features.
            text_feat: (G, D) momentum text features.
            idx: (G,) or (G, 1) ids; required iff the queue was built ``with_idx``.
        """
        num = image_feat.shape[0]
        if text_feat.shape[0] != num or image_feat.shape[1] != self.dim or text_feat.shape[1] != self.dim:
            raise ValueError(
                f"expected (G, {self.dim}) features, got image {tuple(image_feat.shape)}, text {tuple(text_feat.shape)}"
            )
        if (idx is not None) != self.with_idx:
            raise ValueError("idx must be given exactly when the queue was built with_idx=True")
        if num == 0:
            return
        # Only the last Q entries of an oversized batch can survive; skip the rest up front so the
        # scatter below never writes a slot twice (duplicate indices have no defined order).
        keep = min(num, self.size)
        # Slots are computed on the buffer's device from the ptr tensor: no host sync per step.
        offsets = torch.arange(num - keep, num, device=self.ptr.device)
        slots = (self.ptr + offsets) % self.size
        self.image_queue[:, slots] = image_feat[-keep:].detach().t().to(self.image_queue.dtype)
        self.text_queue[:, slots] = text_feat[-keep:].detach().t().to(self.text_queue.dtype)
        if idx is not None:
            self.idx_queue[:, slots] = idx.reshape(-1)[-keep:].to(self.idx_queue.dtype)
        self.ptr.copy_((self.ptr + num) % self.size)

    def features(self) -> QueueFeatures:
        """Copies of the queue contents: image (D, Q), text (D, Q), idx (1, Q) or None.

        Copies, because the caller's loss keeps them for backward while ``enqueue`` later
        overwrites the buffers in place (the original used ``.clone().detach()`` too).
        """
        idx = self.idx_queue.clone() if self.idx_queue is not None else None
        return QueueFeatures(self.image_queue.clone(), self.text_queue.clone(), idx)

    def concat(
        self, image_feat_m: Tensor, text_feat_m: Tensor, idx: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Contrast candidates for :func:`openblip.losses.itc.itc_loss`: batch first, then queue.

        Args:
            image_feat_m: (B, D) momentum image features of the local batch.
            text_feat_m: (B, D) momentum text features of the local batch.
            idx: (B,) ids of the batch; needed for ``idx_all`` when the queue keeps ids.

        Returns:
            ``(image_feat_all, text_feat_all, idx_all)``: (B + Q, D), (B + Q, D), and (B + Q,)
            or None.
        """
        image_all = torch.cat([image_feat_m.detach(), self.image_queue.t().to(image_feat_m.dtype)], dim=0)
        text_all = torch.cat([text_feat_m.detach(), self.text_queue.t().to(text_feat_m.dtype)], dim=0)
        idx_all = None
        if idx is not None:
            if not self.with_idx:
                raise ValueError("this queue keeps no ids; build it with with_idx=True")
            idx_all = torch.cat([idx.reshape(-1).to(self.idx_queue.dtype), self.idx_queue.reshape(-1)])
        return image_all, text_all, idx_all


def _paired_params(online: nn.Module, momentum: nn.Module) -> list[tuple[Tensor, Tensor]]:
    # Pair by name so that a structural mismatch fails loudly instead of mixing up tensors.
    online_params = dict(online.named_parameters())
    momentum_params = dict(momentum.named_parameters())
    if online_params.keys() != momentum_params.keys():
        missing = sorted(online_params.keys() ^ momentum_params.keys())[:5]
        raise ValueError(f"online and momentum modules differ in parameters, e.g. {missing}")
    pairs = [(online_params[k], momentum_params[k]) for k in online_params]
    for name, (p, p_m) in zip(online_params, pairs):
        if p.shape != p_m.shape:
            raise ValueError(f"shape mismatch for {name}: {tuple(p.shape)} vs {tuple(p_m.shape)}")
    return pairs


@torch.no_grad()
def copy_params(online: nn.Module, momentum: nn.Module) -> None:
    """Initialise a momentum module as a copy of the online one and freeze it.

    Only parameters are copied (the original has no buffers to follow, blip_pretrain.py:216-221).
    """
    for p, p_m in _paired_params(online, momentum):
        p_m.copy_(p)
        p_m.requires_grad_(False)


@torch.no_grad()
def momentum_update(online: nn.Module, momentum: nn.Module, m: float = 0.995) -> None:
    """Exponential moving average of parameters: ``p_m = m * p_m + (1 - m) * p``.

    Args:
        online: the trained module.
        momentum: its frozen copy, updated in place.
        m: momentum (0.995 in every shipped config).
    """
    pairs = _paired_params(online, momentum)
    if not pairs:
        return
    online_params = [p.detach() for p, _ in pairs]
    momentum_params = [p_m for _, p_m in pairs]
    # foreach ops update the whole model in a few kernels instead of one per tensor.
    torch._foreach_mul_(momentum_params, m)
    torch._foreach_add_(momentum_params, online_params, alpha=1.0 - m)
