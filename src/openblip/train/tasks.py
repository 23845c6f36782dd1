"""Training tasks: a model plus its objectives, called once per batch by the loop.

A task takes images ``(B,3,S,S)`` and raw captions, tokenises them the way its
objective needs, and returns a dict of losses whose ``"loss"`` entry is the one
to optimise. The loop knows nothing about objectives; the model knows nothing
about losses.

* :class:`PretrainTask` - ITC (momentum distillation, queues) + ITM (hard
  negatives) + LM, encoder and decoder sharing all but self-attention (B);
  optionally with group ids as multi-positives, as retrieval fine-tuning.
* :class:`CaptionTask` - LM on prompt-prefixed captions, prompt masked (D.1).
* :class:`RetrievalTask` - ITC + ITM where all captions of one image are
  positives and hard negatives never share the image (D.2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..losses import itm_labels, itm_loss, mask_prompt_and_padding, ramp_alpha, sample_hard_negatives, scored_positions
from ..models.blip import BlipModel
from ..tokenizer import BlipTokenizer
from .momentum import MomentumContrast


class Task(nn.Module):
    """Base class: ``forward(pixels, captions, *, step, idx=None, generator=None) -> dict``."""

    #: Whether splitting a batch into micro-batches leaves the objective unchanged.
    supports_grad_accumulation = True
    #: Whether ``forward`` takes group ids (``idx``): rows sharing an id are positives.
    with_idx = False

    def __init__(self, model: BlipModel, tokenizer: BlipTokenizer) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer

    def lm_loss(self, ids, mask, image_embeds, labels, label_smoothing: float) -> torch.Tensor:
        """Mean next-token loss; the LM head runs only on positions that have a target."""
        hidden, _ = self.model.decode(ids, mask, states=image_embeds, head=False)
        rows, targets = scored_positions(hidden, labels)
        logits = self.model.lm_head(rows)  # (N, V)
        return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)

    def tokens(self, captions: list[str], first_token: str, max_length: int, padding: str = "longest"):
        enc = self.tokenizer(captions, max_length=max_length, padding=padding, first_token=first_token)
        device = next(self.model.parameters()).device
        return enc["input_ids"].to(device), enc["attention_mask"].to(device)


class _ContrastiveTask(Task):
    """Shared ITC + ITM machinery of pre-training and retrieval fine-tuning."""

    supports_grad_accumulation = False  # in-batch negatives and queues change with micro-batches

    def __init__(self, model, tokenizer, *, queue_size, momentum, alpha, alpha_ramp_steps, with_idx, max_length,
                 padding) -> None:
        super().__init__(model, tokenizer)
        for part in ("text_encoder", "vision_proj", "text_proj", "itm_head"):
            model.part(part, "contrastive training")
        self.contrast = MomentumContrast(model, queue_size=queue_size, momentum=momentum, with_idx=with_idx)
        self.with_idx = with_idx
        self.alpha, self.alpha_ramp_steps = alpha, alpha_ramp_steps
        # Padding to the longest caption (not to max_length, as the original) computes the same
        # losses: padded positions are masked everywhere, and fewer of them cost less.
        self.max_length, self.padding = max_length, padding

    def current_alpha(self, step: int) -> float:
        return ramp_alpha(self.alpha, step, max(self.alpha_ramp_steps, 1), 1.0)

    def itc_itm(self, pixels, captions, step, idx, generator):
        if self.with_idx:
            if idx is None:
                raise ValueError("this task treats samples sharing an id as positives and needs their ids (idx)")
            idx = idx.to(pixels.device).reshape(-1)
        else:
            idx = None
        m = self.model
        m.clamp_temp()
        ids, mask = self.tokens(captions, "cls", self.max_length, self.padding)
        image_embeds = m.encode_image(pixels)  # (B,N,Dv)
        image_feat = m.project_image(image_embeds)
        text_feat = m.project_text(m.encode_text(ids, mask))
        loss_itc, sim_i2t, sim_t2i = self.contrast(
            m, pixels, image_feat, ids, mask, text_feat, self.current_alpha(step), idx
        )
        enc_ids = ids.clone()
        enc_ids[:, 0] = self.tokenizer.enc_token_id
        loss_itm = self._itm(image_embeds, enc_ids, mask, sim_i2t, sim_t2i, idx, generator)
        return loss_itc, loss_itm, image_embeds, ids, mask

    def _itm(self, image_embeds, ids, mask, sim_i2t, sim_t2i, idx, generator):
        b = ids.shape[0]
        eps = 0.0 if idx is not None else 1e-4  # retrieval used plain softmax, pre-training +1e-4
        # A pair whose caption is word for word the row's own is not a negative (the original
        # only excluded the same index, quirk L.14: duplicate web captions became "negatives").
        same_text = ((ids[:, None, :] == ids[None, :, :]) | (mask[:, None, :] == 0)).all(-1)
        neg_img, neg_txt = sample_hard_negatives(sim_i2t, sim_t2i, idx=idx, eps=eps, generator=generator,
                                                 also_positive=same_text)
        # [pos (B) | text + negative image (B) | negative text + image (B)]
        all_ids = torch.cat([ids, ids, ids[neg_txt]])
        all_mask = torch.cat([mask, mask, mask[neg_txt]])
        all_images = torch.cat([image_embeds, image_embeds[neg_img], image_embeds])
        hidden = self.model.encode_grounded(all_ids, all_mask, image_embeds=all_images)
        logits = self.model.itm_logits(hidden)
        return itm_loss(logits.float(), itm_labels(b, device=logits.device))


class PretrainTask(_ContrastiveTask):
    """BLIP pre-training: ``loss = itc + itm + lm`` (unweighted, as the original).

    With ``with_idx`` (an extension: the original had no ids in pre-training), samples
    sharing an id are positives of each other in ITC and never each other's ITM hard
    negatives, e.g. several captions of one image stored as separate samples, or captions
    that describe a class rather than the photo.
    """

    def __init__(self, model: BlipModel, tokenizer: BlipTokenizer, *, queue_size: int = 57600,
                 momentum: float = 0.995, alpha: float = 0.4, alpha_ramp_steps: int = 1,
                 max_length: int = 30, label_smoothing: float = 0.1, with_idx: bool = False) -> None:
        model.part("text_decoder", "pre-training")
        if not model.cfg.tie_encoder_decoder:
            model.cfg.tie_encoder_decoder = True
            model.tie_encoder_decoder()
        super().__init__(model, tokenizer, queue_size=queue_size, momentum=momentum, alpha=alpha,
                         alpha_ramp_steps=alpha_ramp_steps, with_idx=with_idx, max_length=max_length,
                         padding="longest")
        self.label_smoothing = label_smoothing

    def forward(self, pixels, captions, *, step: int, idx=None, generator=None) -> dict[str, torch.Tensor]:
        loss_itc, loss_itm, image_embeds, ids, mask = self.itc_itm(pixels, captions, step, idx, generator)
        dec_ids = ids.clone()
        dec_ids[:, 0] = self.tokenizer.dec_token_id
        labels = mask_prompt_and_padding(dec_ids, mask, 0)
        loss_lm = self.lm_loss(dec_ids, mask, image_embeds, labels, self.label_smoothing)
        return {"loss": loss_itc + loss_itm + loss_lm, "loss_itc": loss_itc, "loss_itm": loss_itm, "loss_lm": loss_lm}


class RetrievalTask(_ContrastiveTask):
    """Retrieval fine-tuning: ITC + ITM with image ids (``idx``) as multi-positives."""

    def __init__(self, model: BlipModel, tokenizer: BlipTokenizer, *, queue_size: int = 57600,
                 momentum: float = 0.995, alpha: float = 0.4, alpha_ramp_steps: int = 1,
                 max_length: int = 35) -> None:
        super().__init__(model, tokenizer, queue_size=queue_size, momentum=momentum, alpha=alpha,
                         alpha_ramp_steps=alpha_ramp_steps, with_idx=True, max_length=max_length,
                         padding="longest")

    def forward(self, pixels, captions, *, step: int, idx=None, generator=None) -> dict[str, torch.Tensor]:
        if idx is None:
            raise ValueError("retrieval fine-tuning needs image ids (idx) so that captions of one image are positives")
        loss_itc, loss_itm, *_ = self.itc_itm(pixels, captions, step, idx, generator)
        return {"loss": loss_itc + loss_itm, "loss_itc": loss_itc, "loss_itm": loss_itm}


class CaptionTask(Task):
    """Captioning fine-tune: LM loss on ``prompt + caption``, prompt and padding masked."""

    def __init__(self, model: BlipModel, tokenizer: BlipTokenizer, *, prompt: str = "a picture of ",
                 max_length: int = 40, label_smoothing: float = 0.1) -> None:
        super().__init__(model, tokenizer)
        model.part("text_decoder", "caption fine-tuning")
        self.prompt, self.max_length, self.label_smoothing = prompt, max_length, label_smoothing
        # [DEC] + prompt tokens; the caption's loss starts after them (4 for "a picture of ").
        self.prompt_length = len(tokenizer.encode_prompt(prompt))

    def forward(self, pixels, captions, *, step: int, idx=None, generator=None) -> dict[str, torch.Tensor]:
        ids, mask = self.tokens([self.prompt + c for c in captions], "dec", self.max_length)
        image_embeds = self.model.encode_image(pixels)
        labels = mask_prompt_and_padding(ids, mask, self.prompt_length)
        loss = self.lm_loss(ids, mask, image_embeds, labels, self.label_smoothing)
        return {"loss": loss, "loss_lm": loss}
