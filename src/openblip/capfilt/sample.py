"""The CapFilt captioner: nucleus sampling that gives the same captions however images are batched.

BLIP generated its synthetic captions with the sampling path of ``BLIP_Decoder.generate``:
transformers 4.15 ``generate(do_sample=True, top_p=0.9, repetition_penalty=1.1)`` with
lengths 10-30 (reference C). That call also applied transformers' default ``top_k=50``
(before top-p), which is why :data:`DEFAULT_TOP_K` is 50 here.

One global random generator, as ``torch.multinomial`` over a batch uses, would tie an
image's captions to its neighbours in the batch, so a rerun with another batch size or
after a restart mid-shard would write different captions. Instead every image gets its
own CPU generator seeded from ``(seed, key)`` and the next token is drawn by inverting the
cumulative distribution with that image's uniform numbers: the decoding stays batched,
and a caption depends only on the image, its key and the seed (up to floating-point
differences between batch sizes, which could only flip a draw lying on a boundary).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from ..models.generation import GenerationConfig, _process, _Stepper, _trim, _warp

if TYPE_CHECKING:
    from ..api import Blip

__all__ = ["DEFAULT_TOP_K", "DEFAULT_TOP_P", "sample_seed", "sample_captions", "sampling_settings"]

DEFAULT_TOP_P = 0.9
DEFAULT_TOP_K = 50  # transformers 4.15 generate's default, in force in the original sampling path
DEFAULT_REPETITION_PENALTY = 1.1  # hard-coded in BLIP_Decoder.generate(sample=True)
DEFAULT_MAX_LENGTH = 30  # counts [DEC] and the prompt, as the original
DEFAULT_MIN_LENGTH = 10


def sample_seed(seed: int, key: str) -> int:
    """A 63-bit seed for one sample, from the run seed and the sample key."""
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def sampling_settings(
    captioner: Blip,
    *,
    prompt: str | None = None,
    num_captions: int = 1,
    top_p: float = DEFAULT_TOP_P,
    top_k: int = DEFAULT_TOP_K,
    temperature: float = 1.0,
    repetition_penalty: float = DEFAULT_REPETITION_PENALTY,
    max_length: int = DEFAULT_MAX_LENGTH,
    min_length: int = DEFAULT_MIN_LENGTH,
) -> tuple[list[int], GenerationConfig]:
    """Prompt ids and the nucleus-sampling configuration (validated) for :func:`sample_captions`."""
    return captioner.caption_settings(
        prompt=prompt, sample=True, top_p=top_p, top_k=top_k, temperature=temperature,
        repetition_penalty=repetition_penalty, max_length=max_length, min_length=min_length,
        num_captions=num_captions,
    )


@torch.inference_mode()
def sample_captions(
    captioner: Blip,
    pixels: torch.Tensor,
    seeds: Sequence[int],
    prompt_ids: list[int],
    gen: GenerationConfig,
) -> list[list[str]]:
    """``gen.num_return_sequences`` sampled captions for each image, prompt stripped.

    Args:
        captioner: a model with an image-grounded decoder.
        pixels: (B, 3, S, S) images preprocessed with ``captioner.transform``.
        seeds: B per-image seeds (see :func:`sample_seed`).
        prompt_ids, gen: from :func:`sampling_settings`.
    """
    if len(seeds) != pixels.shape[0]:
        raise ValueError(f"{pixels.shape[0]} images but {len(seeds)} seeds")
    model = captioner.model
    if model.cfg.decoder_cross != "image":
        raise ValueError("the captioner must be a captioning model, not a VQA model")
    pixels = pixels.to(captioner.device, captioner.dtype)
    cross_kv = model.decoder_cross_kv(model.encode_image(pixels))
    prompt = torch.tensor([prompt_ids], device=captioner.device).expand(pixels.shape[0], -1)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    step = _Stepper(model.part("text_decoder", "captioning"), cross_kv, None)
    seqs = _sample(step, prompt, gen, generators)
    n = gen.num_return_sequences
    texts = [captioner.tokenizer.decode(s[len(prompt_ids) :], clean_up_tokenization_spaces=True).strip() for s in seqs]
    return [texts[i : i + n] for i in range(0, len(texts), n)]


def _sample(
    step: _Stepper, prompt: torch.Tensor, cfg: GenerationConfig, generators: list[torch.Generator]
) -> list[list[int]]:
    """The sampling loop of ``generate`` with one random stream per image (rows grouped by image)."""
    n = cfg.num_return_sequences
    logits, seqs = step(prompt), prompt
    if n > 1:
        step.expand(n)
        logits, seqs = logits.repeat_interleave(n, 0), prompt.repeat_interleave(n, 0)
    finished = torch.zeros(seqs.shape[0], dtype=torch.bool, device=seqs.device)
    while True:
        probs = _warp(_process(logits, seqs, cfg), cfg).softmax(dim=-1)  # (B*n, V)
        # Every image draws n numbers a step, finished or not, so its stream never depends on others.
        uniform = torch.cat([torch.rand(n, generator=g, dtype=torch.float64) for g in generators])
        nxt = _inverse_cdf(probs, uniform.to(probs.device))
        nxt = nxt.masked_fill(finished, cfg.pad_token_id)
        seqs = torch.cat([seqs, nxt[:, None]], dim=1)
        finished |= nxt == cfg.eos_token_id
        if bool(finished.all()) or seqs.shape[1] >= cfg.max_length:
            break
        logits = step(nxt[:, None])
    return [_trim(s, cfg) for s in seqs.tolist()]


def _inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Token index per row: the first whose cumulative probability reaches ``(1 - u) * total``.

    ``1 - u`` lies in (0, 1], so a token of probability 0 (filtered by top-k/top-p) is never
    chosen: its cumulative value equals its predecessor's, which is reached first.
    """
    cdf = probs.float().cumsum(dim=-1)
    target = (1.0 - uniform).to(cdf.dtype)[:, None] * cdf[:, -1:]
    return torch.searchsorted(cdf, target).squeeze(1).clamp_(max=probs.shape[-1] - 1)
