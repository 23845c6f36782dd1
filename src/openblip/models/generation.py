"""Greedy, beam-search and nucleus-sampling decoding for the BLIP text decoder.

The decoding rules follow transformers' ``generate`` (which the original BLIP
called), so the same weights give the same captions:

* ``max_length``/``min_length`` count every token, the leading [DEC] and the
  prompt included;
* beam search keeps ``2 * num_beams`` candidates a step, lets only the best
  ``num_beams`` of them finish, scores a finished hypothesis by its summed
  log-probability divided by ``generated_length ** length_penalty`` and stops a
  batch item once no running beam can beat its worst finished one;
* the repetition penalty divides positive and multiplies negative scores of
  every token already in the sequence (prompt included); in beam search it acts
  on log-probabilities, in greedy and sampling on logits.

What differs is the work: cross-attention keys/values are computed once per
image and shared by all beams and samples of that image (the decoder folds the
beams into the query length), and the prompt is run once per image, not once
per beam. Only the small self-attention cache is reordered between steps. With
one sequence per image (greedy, or one sample), ``cross_kv(states,
cfg.rows_per_input)`` computes no keys/values at all (``med.FoldedKV``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .med import KV, CrossKV, TextDecoder

NEG = -1.0e9


@dataclass
class GenerationConfig:
    """Decoding parameters. Lengths count [DEC] and the prompt."""

    max_length: int = 20
    min_length: int = 0
    num_beams: int = 1
    do_sample: bool = False
    top_p: float = 1.0
    top_k: int = 0
    temperature: float = 1.0
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    num_return_sequences: int = 1
    eos_token_id: int = 102
    pad_token_id: int = 0

    @property
    def rows_per_input(self) -> int:
        """Sequences decoded side by side for each input (beams or samples)."""
        if self.num_beams > 1:
            return self.num_beams
        return self.num_return_sequences if self.do_sample else 1

    def validate(self, prompt_length: int) -> None:
        if self.max_length <= prompt_length:
            raise ValueError(
                f"max_length={self.max_length} leaves no room after the {prompt_length} prompt tokens "
                "([DEC] and the prompt count towards max_length)"
            )
        if self.min_length < 0 or self.min_length > self.max_length:
            raise ValueError(f"min_length={self.min_length} must be between 0 and max_length={self.max_length}")
        if self.num_beams < 1 or self.num_return_sequences < 1:
            raise ValueError("num_beams and num_return_sequences must be at least 1")
        if self.do_sample and self.num_beams > 1:
            raise ValueError("sampling with several beams is not supported; use num_beams=1 with do_sample")
        if not self.do_sample and self.num_return_sequences > self.num_beams:
            raise ValueError(
                f"num_return_sequences={self.num_return_sequences} needs num_beams >= it (or do_sample=True)"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.temperature <= 0.0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if self.repetition_penalty <= 0.0:
            raise ValueError(f"repetition_penalty must be positive, got {self.repetition_penalty}")


def _process(scores: torch.Tensor, seqs: torch.Tensor, cfg: GenerationConfig) -> torch.Tensor:
    """Repetition penalty and minimum length, on (N, V) scores for (N, t) sequences."""
    if cfg.repetition_penalty != 1.0:
        seen = scores.gather(1, seqs)
        seen = torch.where(seen < 0, seen * cfg.repetition_penalty, seen / cfg.repetition_penalty)
        scores = scores.scatter(1, seqs, seen)
    if seqs.shape[1] < cfg.min_length:
        scores = scores.clone()
        scores[:, cfg.eos_token_id] = -float("inf")
    return scores


def _warp(scores: torch.Tensor, cfg: GenerationConfig) -> torch.Tensor:
    """Temperature, top-k and top-p (nucleus) filtering for sampling.

    With top-k on, the nucleus is found among the k survivors only (the others
    have zero probability), which avoids sorting the whole vocabulary every step.
    """
    if cfg.temperature != 1.0:
        scores = scores / cfg.temperature
    if cfg.top_k and cfg.top_k < scores.shape[-1]:
        values, index = scores.topk(cfg.top_k, dim=-1)  # (N, k), descending
        values = _nucleus(values.flip(-1), cfg.top_p).flip(-1) if cfg.top_p < 1.0 else values
        return torch.full_like(scores, -float("inf")).scatter(1, index, values)
    if cfg.top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1)
        return scores.scatter(1, order, _nucleus(sorted_scores, cfg.top_p))
    return scores


def _nucleus(ascending: torch.Tensor, top_p: float) -> torch.Tensor:
    """Mask (to -inf) the least likely entries of ascending scores outside the top-p mass."""
    drop = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1.0 - top_p
    drop[:, -1] = False  # always keep the most likely token
    return ascending.masked_fill(drop, -float("inf"))


class _Stepper:
    """Runs the decoder one step at a time over a growing self-attention cache."""

    def __init__(self, decoder: TextDecoder, cross_kv: list[CrossKV], cross_mask: torch.Tensor | None) -> None:
        self.decoder, self.cross_kv, self.cross_mask = decoder, cross_kv, cross_mask
        self.past: list[KV] | None = None

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        logits, self.past = self.decoder(
            ids,
            cross_kv=self.cross_kv,
            encoder_attention_mask=self.cross_mask,
            past=self.past,
            use_cache=True,
            last_only=True,
        )
        return logits[:, -1].float()  # (N, V)

    def expand(self, times: int) -> None:
        self.past = [(k.repeat_interleave(times, 0), v.repeat_interleave(times, 0)) for k, v in self.past]

    def reorder(self, index: torch.Tensor) -> None:
        self.past = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.past]


@torch.no_grad()
def generate(
    decoder: TextDecoder,
    cross_kv: list[CrossKV],
    prompt_ids: torch.Tensor,
    cfg: GenerationConfig,
    *,
    cross_mask: torch.Tensor | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> list[list[int]]:
    """Decode from ``prompt_ids`` (B, P), which start with [DEC].

    ``cross_kv`` holds the decoder's cross-attention keys/values for the B
    images (or VQA questions), from ``cross_kv(states, cfg.rows_per_input)``
    so that greedy decoding may fold them, ``cross_mask`` (B, N) their padding. Returns
    ``B * num_return_sequences`` token lists (prompt included, ending with
    [SEP] unless cut by ``max_length``), grouped by input.

    Sampling draws from ``generator``; a sequence of B CPU generators gives every
    input its own random stream, so its samples do not depend on the rest of the
    batch (each draws its ``num_return_sequences`` numbers a step by inverting the
    cumulative distribution).
    """
    cfg.validate(prompt_ids.shape[1])
    stepper = _Stepper(decoder, cross_kv, cross_mask)
    if cfg.num_beams > 1:
        return _beam_search(stepper, prompt_ids, cfg)
    return _greedy_or_sample(stepper, prompt_ids, cfg, generator)


def _greedy_or_sample(
    step: _Stepper, prompt: torch.Tensor, cfg: GenerationConfig, generator
) -> list[list[int]]:
    logits = step(prompt)
    n = cfg.num_return_sequences if cfg.do_sample else 1
    seqs = prompt
    if n > 1:
        step.expand(n)
        logits, seqs = logits.repeat_interleave(n, 0), prompt.repeat_interleave(n, 0)
    finished = torch.zeros(seqs.shape[0], dtype=torch.bool, device=seqs.device)
    while True:
        scores = _process(logits, seqs, cfg)
        if cfg.do_sample:
            nxt = _draw(_warp(scores, cfg).softmax(dim=-1), n, generator)
        else:
            nxt = scores.argmax(dim=-1)
        nxt = nxt.masked_fill(finished, cfg.pad_token_id)
        seqs = torch.cat([seqs, nxt[:, None]], dim=1)
        finished |= nxt == cfg.eos_token_id
        if bool(finished.all()) or seqs.shape[1] >= cfg.max_length:
            break
        logits = step(nxt[:, None])
    return [_trim(s, cfg) for s in seqs.tolist()]


def _draw(probs: torch.Tensor, n: int, generator) -> torch.Tensor:
    """One token per row of ``probs`` (rows grouped ``n`` per input)."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)
    if len(generator) * n != probs.shape[0]:
        raise ValueError(f"{len(generator)} generators for {probs.shape[0] // n} inputs")
    # Every input draws n numbers a step, finished or not, so its stream never depends on others.
    uniform = torch.cat([torch.rand(n, generator=g, dtype=torch.float64) for g in generator])
    return _inverse_cdf(probs, uniform.to(probs.device))


def _inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Token index per row: the first whose cumulative probability reaches ``(1 - u) * total``.

    ``1 - u`` lies in (0, 1], so a token of probability 0 (filtered by top-k/top-p) is never
    chosen: its cumulative value equals its predecessor's, which is reached first.
    """
    cdf = probs.float().cumsum(dim=-1)
    target = (1.0 - uniform).to(cdf.dtype)[:, None] * cdf[:, -1:]
    return torch.searchsorted(cdf, target).squeeze(1).clamp_(max=probs.shape[-1] - 1)


def _trim(seq: list[int], cfg: GenerationConfig) -> list[int]:
    return seq[: seq.index(cfg.eos_token_id) + 1] if cfg.eos_token_id in seq else seq


def _beam_search(step: _Stepper, prompt: torch.Tensor, cfg: GenerationConfig) -> list[list[int]]:
    b, p = prompt.shape
    k, keep = cfg.num_beams, 2 * cfg.num_beams
    device = prompt.device
    # The prompt is identical for all beams of an image: run it once, then copy the cache.
    logits = step(prompt).repeat_interleave(k, 0)  # (B*k, V)
    step.expand(k)
    seqs = prompt.repeat_interleave(k, 0)  # (B*k, t)
    run_scores = torch.zeros(b, k, device=device)
    run_scores[:, 1:] = NEG  # only the first beam expands at the first step
    fin_scores = torch.full((b, k), NEG, device=device)
    fin_seqs: list[list[list[int]]] = [[[] for _ in range(k)] for _ in range(b)]
    fin_full = torch.zeros(b, k, dtype=torch.bool, device=device)
    open_ = torch.ones(b, dtype=torch.bool, device=device)  # can still improve
    offsets = torch.arange(b, device=device)[:, None] * k
    while True:
        cur = seqs.shape[1]
        logp = _process(logits.log_softmax(dim=-1), seqs, cfg)
        vocab = logp.shape[-1]
        cand = (logp.view(b, k, vocab) + run_scores[:, :, None]).view(b, k * vocab)
        top_scores, top_idx = cand.topk(keep, dim=1)  # (B, 2k), sorted
        beam, tok = top_idx // vocab, top_idx % vocab
        hits = (tok == cfg.eos_token_id) | (cur + 1 >= cfg.max_length)
        # Finished hypotheses: only among the best k candidates, only while improvable.
        norm = top_scores[:, :k] / float((cur + 1 - p) ** cfg.length_penalty)
        new_ok = hits[:, :k] & open_[:, None]
        merged = torch.cat([fin_scores, torch.where(new_ok, norm, torch.full_like(norm, NEG))], dim=1)
        merged_full = torch.cat([fin_full, new_ok], dim=1)
        fin_scores, pick = merged.topk(k, dim=1)
        fin_full = merged_full.gather(1, pick)
        if bool(new_ok.any()):
            fin_seqs = _merge_finished(fin_seqs, pick, seqs, beam + offsets, tok, new_ok, k)
        # Running beams: the best k candidates that did not stop.
        live = top_scores + hits.float() * NEG
        run_scores, sel = live.topk(k, dim=1)
        src = (beam.gather(1, sel) + offsets).view(-1)  # flat index of each new beam's parent
        nxt = tok.gather(1, sel).view(-1)
        seqs = torch.cat([seqs.index_select(0, src), nxt[:, None]], dim=1)
        best_possible = run_scores[:, 0] / float((cur + 1 - p) ** cfg.length_penalty)
        worst = torch.where(fin_full.all(dim=1), fin_scores.min(dim=1).values, torch.full_like(best_possible, NEG))
        open_ &= best_possible > worst
        if not bool(open_.any()) or bool(hits.all()):
            break
        step.reorder(src)
        logits = step(nxt[:, None])
    out = []
    for i in range(b):
        order = fin_scores[i].argsort(descending=True).tolist()
        out.extend(fin_seqs[i][j] for j in order[: cfg.num_return_sequences])
    return out


def _merge_finished(fin_seqs, pick, seqs, parent, tok, new_ok, k):
    """Rebuild each item's finished list after the merge ``topk`` picked ``pick`` (B, k)."""
    rows, parent, tok, new_ok = seqs.tolist(), parent.tolist(), tok.tolist(), new_ok.tolist()
    out = []
    for i, choice in enumerate(pick.tolist()):
        pool = list(fin_seqs[i])
        for j in range(k):
            pool.append(rows[parent[i][j]] + [tok[i][j]] if new_ok[i][j] else [])
        out.append([pool[c] for c in choice])
    return out
