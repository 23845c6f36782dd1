"""Half-precision (bf16, fp16) inference on CPUs without matrix units for it.

On a CPU with AVX512-BF16 or AMX, PyTorch's bf16 products run on oneDNN kernels made for them
(AVX512-FP16 / AMX-FP16 for fp16). Elsewhere (AVX2 machines, many laptops and cloud VMs) they
fall back to generic code. Measured on a 2-core AVX2 EPYC (torch 2.13): a 577 x 768 x 3072 product
takes 167 ms in bf16 against 32 ms in fp32, the 16-pixel patch convolution of one 384 px image 380 ms
against 6 ms, and attention of 8 queries over 577 image tokens 4.9 ms against 1.1 ms; fp16 is as slow
(137 ms for a 577 x 768 x 3072 product, 338 ms for the convolution). Only one kind of bf16 kernel is
good there: one or two rows times a weight (matrix-vector products, bound by reading the weight, which bf16
halves): one row through BLIP-base's text decoder and LM head, weights read from memory, takes
20 ms against 41 ms with fp32 weights, two rows 32 ms against 43; from three rows on, the fp32
products of ``openblip.models.linear`` are as fast or faster.

So on such CPUs, without gradients, a bf16 (or fp16) model keeps its half-precision weights and
activations between layers but:

* products of one or two rows use the half-precision kernel (the decoding step of greedy search
  on one or two images);
* larger products, attention and the patch convolution compute in fp32 from the bf16 values
  (exactly representable in fp32) and round the result to the model's dtype, as a kernel with fp32
  accumulation would; products of 3-64 rows (batched or beam decoding) and of 1,024 rows or more (the
  image encoder on several images) use the packed fp32 weight copies of ``openblip.models.linear``,
  and hold them in memory, as an fp32 model does;
* image (cross-attention) keys and values are kept in fp32, since they are read at every step
  (greedy decoding keeps the image tokens themselves in fp32 instead: ``med.FoldedKV``).

The results are half-precision results (within rounding of a native kernel's), not fp32 ones.
Training (gradients enabled) and other devices are unchanged. ``OPENBLIP_HALF_IN_FP32=0`` turns this
off (every product then runs on PyTorch's own half-precision kernels); ``=1`` turns it on even on a
CPU with native support.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

NATIVE_ROWS = 2  # up to this many rows the half-precision kernel beats fp32 on AVX2 (half the bytes)
HALF = (torch.bfloat16, torch.float16)


@functools.lru_cache(maxsize=2)
def cpu_has_native(dtype: torch.dtype) -> bool:
    """True when this CPU's oneDNN has fast kernels for ``dtype`` (bf16 or fp16)."""
    name = "_is_mkldnn_bf16_supported" if dtype == torch.bfloat16 else "_is_mkldnn_fp16_supported"
    check = getattr(torch.ops.mkldnn, name, None)
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:
        return False


def compute_in_fp32(x: torch.Tensor) -> bool:
    """True when a product of half-precision ``x`` should be computed in fp32 (see the module docstring)."""
    if x.dtype not in HALF or x.device.type != "cpu" or torch.is_grad_enabled():
        return False
    setting = os.environ.get("OPENBLIP_HALF_IN_FP32", "auto")
    if setting not in ("auto", "0", "1"):
        raise ValueError(f"OPENBLIP_HALF_IN_FP32={setting!r}: use auto (the default), 0 or 1")
    if setting == "0":
        return False
    return setting == "1" or not cpu_has_native(x.dtype)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention``, in fp32 for half-precision queries where :func:`compute_in_fp32`.

    Keys and values may already be fp32 (image keys/values, see ``med.Attention.kv``).
    """
    if not compute_in_fp32(q):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal)
    out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, dropout_p=dropout_p,
                                         is_causal=is_causal)
    return out.to(q.dtype)


def conv2d(x: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    """``conv(x)``, in fp32 for half-precision input where :func:`compute_in_fp32`."""
    if not compute_in_fp32(x):
        return conv(x)
    bias = conv.bias.float() if conv.bias is not None else None
    out = F.conv2d(x.float(), conv.weight.float(), bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    return out.to(x.dtype)
