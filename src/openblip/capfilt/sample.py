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

from ..models.generation import GenerationConfig

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
    pixels = pixels.to(captioner.device, captioner.dtype)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    texts = captioner.caption_pixels(pixels, prompt_ids, gen, generators)
    n = gen.num_return_sequences
    return [texts[i : i + n] for i in range(0, len(texts), n)]
