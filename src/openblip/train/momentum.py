"""Momentum encoders and feature queues for BLIP's contrastive objective (ITC).

The momentum ("teacher") copies of the image encoder, the unimodal text encoder
and the two projections are updated as an exponential moving average of the
online model and never receive gradients. Their features fill the queues and
provide the soft targets of momentum distillation (reference B.1).

Deviation from the original, on purpose: the contrast candidates are the
momentum features of the whole *global* batch (gathered over ranks) followed by
the queue, where the original used only the local batch. The loss then does not
depend on how a batch is split over processes, so 2 ranks x B equals 1 rank x 2B.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..losses import FeatureQueue, itc_loss, momentum_update
from ..models.blip import BlipModel
from . import distributed as dist


class MomentumContrast(nn.Module):
    """Teacher encoders + queues; ``forward`` returns the ITC loss and the in-batch similarities."""

    def __init__(self, model: BlipModel, *, queue_size: int, momentum: float = 0.995, with_idx: bool = False) -> None:
        super().__init__()
        self.momentum = momentum
        self.visual_encoder_m = _frozen_copy(model.visual_encoder)
        self.vision_proj_m = _frozen_copy(model.vision_proj)
        self.text_encoder_m = _frozen_copy(model.text_encoder)
        self.text_proj_m = _frozen_copy(model.text_proj)
        self.queue = FeatureQueue(model.cfg.embed_dim, queue_size, with_idx=with_idx)

    def pairs(self, model: BlipModel) -> list[tuple[nn.Module, nn.Module]]:
        return [
            (model.visual_encoder, self.visual_encoder_m),
            (model.vision_proj, self.vision_proj_m),
            (model.text_encoder, self.text_encoder_m),
            (model.text_proj, self.text_proj_m),
        ]

    @torch.no_grad()
    def teacher(self, model: BlipModel, pixels, ids, mask) -> tuple[torch.Tensor, torch.Tensor]:
        """EMA update, then normalised momentum features ``(B,E)`` of images and texts."""
        for online, teacher in self.pairs(model):
            momentum_update(online, teacher, self.momentum)
        image_m = self.visual_encoder_m(pixels)
        image_feat_m = F.normalize(self.vision_proj_m(image_m[:, 0]), dim=-1)
        text_m, _ = self.text_encoder_m(ids, mask)
        text_feat_m = F.normalize(self.text_proj_m(text_m[:, 0]), dim=-1)
        return image_feat_m.float(), text_feat_m.float()

    def forward(
        self,
        model: BlipModel,
        pixels: torch.Tensor,
        image_feat: torch.Tensor,
        ids: torch.Tensor,
        mask: torch.Tensor,
        text_feat: torch.Tensor,
        alpha: float,
        idx: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ITC loss and the local (B,B) similarities (image->text, text->image) of online
        features against momentum features, from which hard negatives are drawn."""
        image_feat_m, text_feat_m = self.teacher(model, pixels, ids, mask)
        img_all, txt_all, idx_all, gathered = self._candidates(image_feat_m, text_feat_m, idx)
        temp = model.temp
        loss = itc_loss(
            image_feat.float(), text_feat.float(), img_all, txt_all, temp,
            alpha=alpha, image_feat_m=image_feat_m, text_feat_m=text_feat_m, idx=idx, idx_all=idx_all,
        )
        self.queue.enqueue(*gathered)
        with torch.no_grad():
            sim_i2t = image_feat.float() @ text_feat_m.T / temp
            sim_t2i = text_feat.float() @ image_feat_m.T / temp
        return loss, sim_i2t, sim_t2i

    def _candidates(self, image_feat_m, text_feat_m, idx):
        """Local momentum features first (their positives sit on the diagonal), then the
        other ranks' (same candidate set as one process with the global batch), then the queue."""
        b, rank = image_feat_m.shape[0], dist.get_rank()
        g_img, g_txt = dist.all_gather(image_feat_m), dist.all_gather(text_feat_m)
        g_idx = dist.all_gather(idx.reshape(-1)) if idx is not None else None

        def others(t):
            return torch.cat([t[: rank * b], t[(rank + 1) * b :]]) if t.shape[0] > b else t[:0]

        q = self.queue.features()
        img_all = torch.cat([image_feat_m, others(g_img), q.image.T])
        txt_all = torch.cat([text_feat_m, others(g_txt), q.text.T])
        idx_all = None
        if idx is not None:
            idx_all = torch.cat([idx.reshape(-1), others(g_idx), q.idx.reshape(-1)])
        return img_all, txt_all, idx_all, (g_img, g_txt, g_idx)


def _frozen_copy(module: nn.Module) -> nn.Module:
    twin = copy.deepcopy(module)
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin
