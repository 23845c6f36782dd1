"""The MED text transformer: one BERT-style layer type serves all three BLIP modes.

* unimodal text encoder (ITC): bidirectional self-attention, no cross-attention;
* image-grounded text encoder (ITM, VQA question): self-attention, then
  cross-attention to image tokens;
* image-grounded text decoder (LM, captioning, VQA answers): causal
  self-attention with cached keys/values, then cross-attention.

Module names follow the original checkpoints (``attention.self.query``,
``crossattention.output.dense``, ``cls.predictions.transform``...), so official
and transformers state dicts load without renaming the text side.

Cross-attention keys and values depend only on the image (or question) tokens,
so callers may compute them once with :meth:`TextTransformer.cross_kv` and reuse
them for every decoding step, every beam and every text scored against an image.
A query batch that is a multiple ``r`` of the key batch attends to key batch
item ``i // r`` (beams and candidate texts are laid out contiguously per image).
When each image has a single query row per step (greedy decoding, one sample),
``cross_kv`` may instead keep the image tokens themselves (:class:`FoldedKV`) and
never compute keys or values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import TextConfig
from . import half
from .linear import Linear, linear
from .skip_init import Embedding, init_skipped

KV = tuple[torch.Tensor, torch.Tensor]
# Folding pays when an image has at most this many query rows per decoding step (see FoldedKV).
FOLD_ROWS = 1


class FoldedKV:
    """Cross-attention source that keeps the encoder tokens ``E`` (B, N, Dc) instead of keys and values.

    Attention over keys ``E Wk^T + bk`` and values ``E Wv^T + bv`` is computed as attention over
    ``E`` itself: head ``h``'s query goes through ``Wk_h`` first (``q_h . k_j = (q_h Wk_h) . e_j``
    plus ``q_h . bk_h``, a term equal for every token that the softmax cancels), and the weighted
    sum of tokens goes through ``Wv_h`` after (the weights sum to one, so ``bv`` adds unchanged).
    Same result up to float rounding; ~12x the attention arithmetic per query row, but no keys or
    values: at BLIP-base size with a 384 px image those are 16 GFLOP an image (~0.15 s on a 2-core
    CPU) and 42 MB read at every step, where ``E`` is 1.8 MB shared by all layers (each step reads
    ``Wk`` and ``Wv`` instead, 4.7 MB a layer). That wins for one query row per image and step
    (greedy decoding, one sample per image): on a 2-core EPYC, 8 greedy BLIP-base captions decode
    in 3.35 s instead of 4.11, one image at a time breaks even. It loses with beams or many texts
    per image, which read each key once for all their rows.
    """

    __slots__ = ("states",)

    def __init__(self, states: torch.Tensor) -> None:
        # Half-precision states where products compute in fp32 anyway: convert once, not per step.
        self.states = (states.float() if half.compute_in_fp32(states) else states).contiguous()


CrossKV = KV | FoldedKV


def cross_batch(kv: CrossKV) -> int:
    """Number of images (or questions) a layer's cross-attention source holds."""
    return kv.states.shape[0] if isinstance(kv, FoldedKV) else kv[0].shape[0]


class QKV(nn.Module):
    """Query/key/value projections; keys and values may come from another width."""

    def __init__(self, width: int, kv_width: int) -> None:
        super().__init__()
        self.query = Linear(width, width)
        self.key = Linear(kv_width, width)
        self.value = Linear(kv_width, width)


class AddNorm(nn.Module):
    """Post-norm residual: ``LayerNorm(dropout(dense(x)) + residual)``."""

    def __init__(self, in_width: int, width: int, eps: float, dropout: float) -> None:
        super().__init__()
        self.dense = Linear(in_width, width)
        self.LayerNorm = nn.LayerNorm(width, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, d = x.shape
    return x.view(b, n, heads, d // heads).transpose(1, 2)  # (B,N,D) -> (B,H,N,d)


def _merge(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)  # (B,H,N,d) -> (B,N,D)


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, kv_width: int) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.dropout = cfg.attention_dropout
        self.self = QKV(cfg.width, kv_width)
        self.output = AddNorm(cfg.width, cfg.width, cfg.layer_norm_eps, cfg.hidden_dropout)

    def kv(self, states: torch.Tensor) -> KV:
        k, v = _heads(self.self.key(states), self.heads), _heads(self.self.value(states), self.heads)
        if not torch.is_grad_enabled():
            # Read again at every decoding step (and for every text scored against the image):
            # CPU attention over contiguous (B,H,N,d) keys/values runs ~1.5x faster than over the
            # transposed view (8 images x 577 tokens: 2.5 vs 3.9 ms a layer and step).
            k, v = k.contiguous(), v.contiguous()
            if half.compute_in_fp32(k):  # read at every step: keep them in the dtype attention runs in
                k, v = k.float(), v.float()
        return k, v

    def _sdpa(self, q, k, v, mask, is_causal=False) -> torch.Tensor:
        p = self.dropout if self.training else 0.0
        return half.attention(q, k, v, mask, p, is_causal)

    def self_attend(
        self, x: torch.Tensor, mask: torch.Tensor | None, is_causal: bool, past: KV | None
    ) -> tuple[torch.Tensor, KV]:
        q = _heads(self.self.query(x), self.heads)
        k, v = self.kv(x)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        out = self._sdpa(q, k, v, mask, is_causal)
        return self.output(_merge(out), x), (k, v)

    def cross_attend(self, x: torch.Tensor, kv: CrossKV, mask: torch.Tensor | None) -> torch.Tensor:
        if isinstance(kv, FoldedKV):
            return self.output(self._folded_attend(x, kv.states, mask), x)
        q = _heads(self.self.query(x), self.heads)
        k, v = kv
        bq, bk = q.shape[0], k.shape[0]
        if bq == bk:
            out = self._sdpa(q, k, v, mask)
        else:
            # r queries per key batch item: fold them into the query length so the
            # image keys/values are read once instead of being copied r times.
            if bq % bk:
                raise ValueError(f"query batch {bq} is not a multiple of key batch {bk}")
            r, (_, h, n, d) = bq // bk, q.shape
            q = q.view(bk, r, h, n, d).transpose(1, 2).reshape(bk, h, r * n, d)
            out = self._sdpa(q, k, v, mask)
            out = out.view(bk, h, r, n, d).transpose(1, 2).reshape(bq, h, n, d)
        return self.output(_merge(out), x)

    def _folded_attend(self, x: torch.Tensor, states: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Cross-attention of ``x`` (Bq, n, D) over ``states`` (Bk, N, Dc) without keys or values (FoldedKV)."""
        bq, n, width = x.shape
        bk, tokens, dc = states.shape
        if bq % bk:
            raise ValueError(f"query batch {bq} is not a multiple of key batch {bk}")
        h, m = self.heads, (bq // bk) * n  # m query rows per image
        d = width // h
        wk = self.self.key.weight.view(h, d, dc).to(states.dtype)
        wv = self.self.value.weight.view(h, d, dc).to(states.dtype)
        q = self.self.query(x).to(states.dtype).view(bk * m, h, d).transpose(0, 1)  # (h, Bk*m, d)
        qk = torch.bmm(q, wk).mul_(d**-0.5)  # (h, Bk*m, Dc)
        qk = qk.view(h, bk, m, dc).transpose(0, 1).reshape(bk, h * m, dc)
        scores = torch.bmm(qk, states.transpose(1, 2))  # (Bk, h*m, N)
        if mask is not None:  # (Bk, 1, 1, N), True = attend
            scores.masked_fill_(~mask.view(bk, 1, tokens), -float("inf"))
        p = self.dropout if self.training else 0.0
        weights = F.dropout(scores.softmax(dim=-1), p, self.training)
        mixed = torch.bmm(weights, states)  # (Bk, h*m, Dc)
        mixed = mixed.view(bk, h, m, dc).transpose(0, 1).reshape(h, bk * m, dc)
        out = torch.bmm(mixed, wv.transpose(1, 2))  # (h, Bk*m, d)
        out = out.transpose(0, 1).reshape(bq, n, width).to(x.dtype)
        return out + self.self.value.bias if self.self.value.bias is not None else out


class Intermediate(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.dense = Linear(cfg.width, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class TextLayer(nn.Module):
    """Self-attention (optionally causal), optional cross-attention, feed-forward."""

    def __init__(self, cfg: TextConfig, cross_width: int | None) -> None:
        super().__init__()
        self.attention = Attention(cfg, cfg.width)
        self.crossattention = Attention(cfg, cross_width) if cross_width else None
        self.intermediate = Intermediate(cfg)
        self.output = AddNorm(cfg.intermediate_size, cfg.width, cfg.layer_norm_eps, cfg.hidden_dropout)

    def forward(
        self,
        x: torch.Tensor,
        self_mask: torch.Tensor | None,
        is_causal: bool = False,
        past: KV | None = None,
        cross_kv: CrossKV | None = None,
        cross_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, KV]:
        x, present = self.attention.self_attend(x, self_mask, is_causal, past)
        if cross_kv is not None:
            if self.crossattention is None:
                raise ValueError("this text transformer was built without cross-attention")
            x = self.crossattention.cross_attend(x, cross_kv, cross_mask)
        return self.output(self.intermediate(x), x), present


class TextEmbeddings(nn.Module):
    """Word + absolute position embeddings, LayerNorm, dropout (no token types)."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.word_embeddings = Embedding(cfg.vocab_size, cfg.width, padding_idx=cfg.pad_token_id)
        self.position_embeddings = Embedding(cfg.max_position_embeddings, cfg.width)
        self.LayerNorm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, input_ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        length = input_ids.shape[1]
        if start + length > self.position_embeddings.num_embeddings:
            raise ValueError(
                f"text of {start + length} tokens exceeds the {self.position_embeddings.num_embeddings} "
                "position embeddings of this model"
            )
        pos = torch.arange(start, start + length, device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(pos)
        return self.dropout(self.LayerNorm(x))


class Encoder(nn.Module):
    def __init__(self, cfg: TextConfig, cross_width: int | None) -> None:
        super().__init__()
        self.layer = nn.ModuleList(TextLayer(cfg, cross_width) for _ in range(cfg.depth))


def _self_mask(
    attention_mask: torch.Tensor | None, q_len: int, past_len: int, causal: bool
) -> tuple[torch.Tensor | None, bool]:
    """Boolean mask (True = attend) for self-attention, or None with an is_causal flag.

    ``attention_mask`` (B, past_len + q_len) marks real tokens (1) and padding (0).
    """
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None  # no padding: let SDPA take its unmasked fast path
    if attention_mask is None:
        if not causal or q_len == 1:
            return None, False
        if past_len == 0:
            return None, True
    total = past_len + q_len
    keys = None if attention_mask is None else attention_mask[:, None, None, :total].bool()  # (B,1,1,T)
    if causal:
        device = attention_mask.device if attention_mask is not None else None
        tri = torch.ones(q_len, total, dtype=torch.bool, device=device).tril(diagonal=past_len)
        keys = tri[None, None] if keys is None else keys & tri[None, None]  # (B,1,Q,T)
    return keys, False


class TextTransformer(nn.Module):
    """BERT-style text transformer with optional cross-attention in every layer.

    ``forward`` returns the last hidden states ``(B, L, D)`` and, with
    ``use_cache``, the self-attention keys/values of every layer.
    """

    def __init__(self, cfg: TextConfig, cross_width: int | None) -> None:
        super().__init__()
        self.cfg = cfg
        self.embeddings = TextEmbeddings(cfg)
        self.encoder = Encoder(cfg, cross_width)
        self.grad_checkpointing = False

    def cross_kv(self, states: torch.Tensor, rows_per_item: int | None = None) -> list[CrossKV]:
        """Per-layer cross-attention keys/values for image (or question) tokens ``(B,N,Dc)``.

        ``rows_per_item``: how many query rows each item will have per call (1 for greedy
        decoding). With at most ``FOLD_ROWS``, on CPU, in fp32 (or half precision computed in
        fp32, see ``openblip.models.half``) and without gradients, the layers share one
        :class:`FoldedKV` of ``states`` instead (no keys or values computed).
        """
        fp32 = states.dtype == torch.float32 or half.compute_in_fp32(states)
        if (rows_per_item is not None and rows_per_item <= FOLD_ROWS and states.device.type == "cpu"
                and fp32 and not torch.is_grad_enabled()):
            return [FoldedKV(states)] * len(self.encoder.layer)
        return [layer.crossattention.kv(states) for layer in self.encoder.layer]

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        causal: bool = False,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        cross_kv: list[CrossKV] | None = None,
        past: list[KV] | None = None,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, list[KV] | None]:
        past_len = past[0][0].shape[2] if past else 0
        x = self.embeddings(input_ids, start=past_len)
        self_mask, is_causal = _self_mask(attention_mask, input_ids.shape[1], past_len, causal)
        if cross_kv is None and encoder_hidden_states is not None:
            cross_kv = self.cross_kv(encoder_hidden_states)
        cross_mask = None
        if encoder_attention_mask is not None and not bool(encoder_attention_mask.all()):
            cross_mask = encoder_attention_mask[:, None, None, :].bool()  # (B,1,1,N)
        presents: list[KV] = []
        for i, layer in enumerate(self.encoder.layer):
            args = (self_mask, is_causal, past[i] if past else None, cross_kv[i] if cross_kv else None, cross_mask)
            if self.grad_checkpointing and self.training:
                x, present = checkpoint(layer, x, *args, use_reentrant=False)
            else:
                x, present = layer(x, *args)
            if use_cache:
                presents.append(present)
        return x, (presents if use_cache else None)


class PredictionTransform(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.dense = Linear(cfg.width, cfg.width)
        self.LayerNorm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.gelu(self.dense(x)))


class Predictions(nn.Module):
    """BERT MLM head: transform, then the (tied) output matrix plus a bias."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.transform = PredictionTransform(cfg)
        self.decoder = Linear(cfg.width, cfg.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(self.transform(x), self.decoder.weight, self.bias, self.decoder)


class LMHead(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.predictions = Predictions(cfg)


class TextDecoder(nn.Module):
    """Image-grounded causal decoder: ``bert`` (TextTransformer) + ``cls`` (LM head).

    The output matrix is tied to the word embeddings.
    """

    def __init__(self, cfg: TextConfig, cross_width: int) -> None:
        super().__init__()
        self.bert = TextTransformer(cfg, cross_width)
        self.cls = LMHead(cfg)
        self.tie_weights()

    def tie_weights(self) -> None:
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        cross_kv: list[CrossKV] | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        past: list[KV] | None = None,
        use_cache: bool = False,
        last_only: bool = False,
        head: bool = True,
    ) -> tuple[torch.Tensor, list[KV] | None]:
        """Logits ``(B, L, V)`` (``(B, 1, V)`` with ``last_only``) and the new cache.

        ``head=False`` returns the hidden states ``(B, L, D)`` instead, so that a loss
        can apply the LM head to the positions it scores only.
        """
        hidden, presents = self.bert(
            input_ids,
            attention_mask,
            causal=True,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            cross_kv=cross_kv,
            past=past,
            use_cache=use_cache,
        )
        if last_only:
            hidden = hidden[:, -1:]
        return (self.cls.predictions(hidden) if head else hidden), presents


def init_bert_weights(module: nn.Module, std: float = 0.02) -> None:
    """BERT initialisation: normal(0, std) for linear and embedding weights."""
    if init_skipped():
        return
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
