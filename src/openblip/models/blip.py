"""The BLIP model: a ViT image encoder and the MED text transformer in its three modes.

:class:`BlipModel` holds whichever parts a checkpoint carries (see
:class:`~openblip.config.BlipConfig`) under the original module names
(``visual_encoder``, ``text_encoder``, ``text_decoder``, ``vision_proj``,
``text_proj``, ``itm_head``, ``temp``). It returns features and logits; losses
live in :mod:`openblip.losses` and decoding in :mod:`openblip.models.generation`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import BlipConfig
from .med import KV, CrossKV, TextDecoder, TextTransformer, init_bert_weights
from .vit import VisionTransformer

DEC_TOKEN_ID = 30522
ENC_TOKEN_ID = 30523
CLS_TOKEN_ID = 101
SEP_TOKEN_ID = 102
PAD_TOKEN_ID = 0


class MissingPartError(RuntimeError):
    """The loaded weights do not include the part a task needs."""


class BlipModel(nn.Module):
    def __init__(self, cfg: BlipConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.visual_encoder = VisionTransformer(cfg.vision)
        if cfg.has_text_encoder:
            self.text_encoder = TextTransformer(cfg.text, cross_width=cfg.vision.width)
            init_bert_weights(self.text_encoder)
        if cfg.has_text_decoder:
            self.text_decoder = TextDecoder(cfg.text, cfg.decoder_cross_width)
            init_bert_weights(self.text_decoder)
            self.text_decoder.tie_weights()
        if cfg.has_itc:
            self.vision_proj = nn.Linear(cfg.vision.width, cfg.embed_dim)
            self.text_proj = nn.Linear(cfg.text.width, cfg.embed_dim)
            self.temp = nn.Parameter(torch.tensor(0.07))
        if cfg.has_itm:
            self.itm_head = nn.Linear(cfg.text.width, 2)
        if cfg.tie_encoder_decoder:
            self.tie_encoder_decoder()

    # -- parts ------------------------------------------------------------------
    def part(self, name: str, task: str) -> nn.Module:
        module = getattr(self, name, None)
        if module is None:
            raise MissingPartError(
                f"{task} needs `{name}`, which these weights do not have (a {self.cfg.task!r} model); "
                f"load a checkpoint trained for {task}"
            )
        return module

    def tie_encoder_decoder(self) -> None:
        """Share every encoder parameter with the decoder except self-attention (BLIP A.3)."""
        enc, dec = self.part("text_encoder", "tying"), self.part("text_decoder", "tying").bert
        for name, module in enc.named_modules():
            if ".attention." in f".{name}." or not hasattr(module, "weight"):
                continue
            target = dec.get_submodule(name)
            for pname, _ in list(module.named_parameters(recurse=False)):
                setattr(module, pname, getattr(target, pname))

    # -- image ------------------------------------------------------------------
    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Image tokens ``(B, 1+N, Dv)``; token 0 is the global feature."""
        return self.visual_encoder(pixel_values)

    def project_image(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Normalised ITC image feature ``(B, E)`` from the class token."""
        return F.normalize(self.part("vision_proj", "ITC").forward(image_embeds[:, 0]), dim=-1)

    # -- text -------------------------------------------------------------------
    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Unimodal text tokens ``(B, L, Dt)`` (ids start with [CLS])."""
        hidden, _ = self.part("text_encoder", "text encoding")(input_ids, attention_mask)
        return hidden

    def project_text(self, text_embeds: torch.Tensor) -> torch.Tensor:
        """Normalised ITC text feature ``(B, E)`` from the first token."""
        return F.normalize(self.part("text_proj", "ITC").forward(text_embeds[:, 0]), dim=-1)

    def image_cross_kv(self, image_embeds: torch.Tensor) -> list[KV]:
        """Cross-attention keys/values of the image-grounded encoder, once per image."""
        return self.part("text_encoder", "image-grounded encoding").cross_kv(image_embeds)

    def encode_grounded(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        image_embeds: torch.Tensor | None = None,
        cross_kv: list[KV] | None = None,
        image_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Image-grounded text tokens ``(B, L, Dt)``.

        Pass ``image_embeds`` (B,N,Dv) or precomputed ``cross_kv``; a text batch
        that is ``r`` times the image batch scores ``r`` consecutive texts per image.
        """
        encoder = self.part("text_encoder", "image-grounded encoding")
        hidden, _ = encoder(
            input_ids,
            attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
            cross_kv=cross_kv,
        )
        return hidden

    def itm_logits(self, grounded_embeds: torch.Tensor) -> torch.Tensor:
        """ITM logits ``(B, 2)``; class 1 means "matches"."""
        return self.part("itm_head", "ITM").forward(grounded_embeds[:, 0])

    def decoder_cross_kv(self, states: torch.Tensor, rows_per_item: int | None = None) -> list[CrossKV]:
        """Decoder cross-attention keys/values for image (or VQA question) tokens.

        ``rows_per_item``: decoded sequences per item (``GenerationConfig.rows_per_input``);
        one allows the folded form (see ``TextTransformer.cross_kv``).
        """
        return self.part("text_decoder", "decoding").bert.cross_kv(states, rows_per_item)

    def decode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        states: torch.Tensor | None = None,
        states_mask: torch.Tensor | None = None,
        cross_kv: list[CrossKV] | None = None,
        past: list[KV] | None = None,
        use_cache: bool = False,
        last_only: bool = False,
        head: bool = True,
    ) -> tuple[torch.Tensor, list[KV] | None]:
        """Decoder logits ``(B, L, V)`` for ids starting with [DEC] (hidden states with ``head=False``)."""
        return self.part("text_decoder", "decoding")(
            input_ids,
            attention_mask,
            cross_kv=cross_kv,
            encoder_hidden_states=states,
            encoder_attention_mask=states_mask,
            past=past,
            use_cache=use_cache,
            last_only=last_only,
            head=head,
        )

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits ``(..., V)`` for decoder hidden states ``(..., D)``."""
        return self.part("text_decoder", "decoding").cls.predictions(hidden)

    def clamp_temp(self) -> None:
        """Keep the learned temperature in [0.001, 0.5], as BLIP does every step."""
        with torch.no_grad():
            self.part("temp", "ITC").clamp_(0.001, 0.5)
