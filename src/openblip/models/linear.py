"""Inference matrix products on CPU: decoding steps and multi-image batches through oneDNN.

A decoding step multiplies a few rows (one token per image or beam) by every weight matrix. On
CPU the MKL GEMM behind ``F.linear`` handles 2-64 rows badly; oneDNN (PyTorch's ``mkldnn``
backend) with the weight re-laid out once into its blocked format does much better. Measured on
a 2-core AVX2 EPYC at BLIP-base shapes (``benchmarks/results/linear_kernels.md``): 3 rows through
the 768 x 3072 FFN take 0.41 ms instead of 1.64 ms, 8 rows through the 30,524-word LM head 10.6 ms
instead of 34.8 ms. So, without gradients, on CPU, in fp32, for 2-64 rows through a weight of at
least 2^18 entries, ``linear`` goes through oneDNN: on the plain weight for its first ``PACK_AFTER``
uses, then on a copy packed once and cached per module (so that captioning one image does not pay for
packing it never earns back). Small weights stay with ``F.linear``: a oneDNN call costs ~0.1 ms whatever
its size. The packed weight wins again from 1,024 rows on, the image encoder on two or more images
(ViT-B/16 on 16 images at 384 px: 17.2 s instead of 20.6), packed at first use there, but not at one
image's 577 rows.

One row (greedy decoding of one image) is bound by reading the weight, which MKL's and oneDNN's
matrix-vector kernels do on a single thread; ``linear`` splits the weight's rows into one block per
thread and multiplies them in one ``bmm`` (:func:`_split_one_row`): ~14 GB/s instead of ~9 on that
machine. With one thread, the LM head (8M entries or more) goes through oneDNN and smaller weights
through ``F.linear``.

Everything else is ``F.linear`` unchanged: gradients, other devices and dtypes, 65-1,023 rows.
The cached copies cost the memory of the weights they pack (the text decoder's ~550 MB at
BLIP-base size when captioning, the ViT-B's ~340 MB when encoding several images at once); a copy
is rebuilt when its weight changes and is never saved.
Results differ from ``F.linear`` by float rounding only (~1e-6). ``OPENBLIP_ONEDNN=0`` in the
environment switches the oneDNN path off; a PyTorch built without oneDNN falls back to
``weight @ x^T`` for 2-4 rows, which MKL handles better than ``F.linear``.

bf16 and fp16 inputs on a CPU without matrix units for them take the rules of ``openblip.models.half``.
"""

from __future__ import annotations

import functools
import os
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from . import half
from .skip_init import SkippableInit

PACK_ROWS = 64  # up to this many rows the packed weight wins (1.1-4.6x measured at 3-48 rows)
# Few-row products use oneDNN on the plain weight (as fast as MKL's matrix-vector form at 2-4 rows,
# faster beyond) until a weight's PACK_AFTER-th use, then pack it: 20-25% faster again, but packing the
# BLIP-base decoder takes ~0.5 s and ~490 MB, which one image's caption (15-20 steps) does not earn back.
PACK_AFTER = 32
# From this many rows on (the image encoder on two or more images: 577 tokens each) the packed weight
# wins again: the ViT-B/16 encoder on 16 images at 384 px took 17.2 s instead of 20.6 (median of 4).
# In between (one image's 577 tokens, text batches) MKL is as fast or faster.
MANY_ROWS = 1024
# One row through a weight below this many entries: MKL's matrix-vector path (F.linear) is as fast
# as a oneDNN call or faster (768 x 768: 0.11 vs 0.12-0.22 ms); above it (the LM head) oneDNN wins.
GEMV_MAX_ENTRIES = 8_000_000
# A oneDNN call costs ~0.1 ms however small the product: below this many weight entries (the tiny
# preset's 64 x 256 layers: 0.02 ms with F.linear) it loses.
MIN_ENTRIES = 1 << 18
SMALL_ROWS = 4  # the fallback's few-row path (PyTorch without oneDNN)
# One row times a weight as a batch of row blocks (see _split_one_row); False restores the MKL/oneDNN
# matrix-vector path.
SPLIT_ONE_ROW = True


def _onednn_op():
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    reorder = getattr(torch.ops.mkldnn, "_reorder_linear_weight", None)
    if op is None or reorder is None or not torch.backends.mkldnn.is_available():
        return None, None
    return op, reorder


_OP, _REORDER = _onednn_op()
# module -> (weight key, packed weight); outside the module so that deepcopy, pickling and
# state dicts never see the opaque oneDNN tensors, and freed with the module.
_PACKED: weakref.WeakKeyDictionary[nn.Module, tuple] = weakref.WeakKeyDictionary()
_USES: weakref.WeakKeyDictionary[nn.Module, tuple] = weakref.WeakKeyDictionary()  # (weight key, few-row uses)


def onednn_enabled() -> bool:
    """True when CPU inference products go through oneDNN (see the module docstring)."""
    return _OP is not None and os.environ.get("OPENBLIP_ONEDNN", "1") != "0"


def _packed(owner: nn.Module, weight: torch.Tensor, eager: bool) -> torch.Tensor | None:
    """The packed copy of ``weight``, made now (``eager``) or at its PACK_AFTER-th use; None before."""
    try:
        version = weight._version
    except RuntimeError:  # inference tensors keep no version counter
        version = None
    key = (weight.data_ptr(), version, tuple(weight.shape))
    cached = _PACKED.get(owner)
    if cached is not None:
        if cached[0] == key:
            return cached[1]
        del _PACKED[owner]  # the weight changed: its old copy is stale
    if not eager:
        seen = _USES.get(owner)
        uses = seen[1] + 1 if seen is not None and seen[0] == key else 1
        if uses < PACK_AFTER:
            _USES[owner] = (key, uses)
            return None
        _USES.pop(owner, None)
    packed = _REORDER(weight.detach().float())
    _PACKED[owner] = (key, packed)
    return packed


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, owner: nn.Module | None = None
) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through oneDNN for few-row and multi-image CPU inference.

    ``owner`` (the module holding ``weight``) keeps the packed copy; without it the oneDNN
    path is not taken. Half-precision inputs follow ``openblip.models.half``.
    """
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if rows and weight.dtype == x.dtype and half.compute_in_fp32(x):
        return _half_linear(x, weight, bias, owner, rows)
    if (rows == 0 or PACK_ROWS < rows < MANY_ROWS or torch.is_grad_enabled() or x.device.type != "cpu"
            or x.dtype != torch.float32 or weight.dtype != torch.float32 or weight.numel() < MIN_ENTRIES):
        return F.linear(x, weight, bias)
    if rows == 1:
        parts = _row_blocks(weight)
        if parts > 1:
            return _split_one_row(x, weight, bias, parts)
        if weight.numel() < GEMV_MAX_ENTRIES:
            return F.linear(x, weight, bias)
    if owner is not None and onednn_enabled():
        packed = _packed(owner, weight, eager=rows >= MANY_ROWS)
        return _OP(x, weight if packed is None else packed, bias, "none", [], "")
    if rows > SMALL_ROWS:  # only 2-4 rows gain from the fallback's matrix-vector form
        return F.linear(x, weight, bias)
    xt = x.reshape(rows, x.shape[-1]).t()  # (in, rows)
    out = torch.addmm(bias[:, None], weight, xt) if bias is not None else weight @ xt  # (out, rows)
    return out.t().contiguous().view(*x.shape[:-1], weight.shape[0])


def _row_blocks(weight: torch.Tensor) -> int:
    """Blocks to split a weight's rows into for a one-row product: one per thread, or 1 (no split)."""
    if not SPLIT_ONE_ROW or not weight.is_contiguous():
        return 1
    return _largest_divisor(weight.shape[0], torch.get_num_threads())


@functools.lru_cache(maxsize=256)
def _largest_divisor(n: int, at_most: int) -> int:
    """The largest divisor of ``n`` that is at most ``at_most``, or 1 if it is 1."""
    return next((d for d in range(min(at_most, n), 1, -1) if n % d == 0), 1)


def _split_one_row(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, parts: int) -> torch.Tensor:
    """One row times ``weight`` as ``parts`` products with its row blocks, one per thread.

    A single-row product reads the whole weight to do 2 FLOPs per entry: it is bound by memory, and
    MKL's and oneDNN's matrix-vector kernels read it on one thread (~9 GB/s on a 2-core EPYC, the same
    with one thread or two). ``bmm`` over row blocks runs the blocks on separate threads: ~14 GB/s, so
    a greedy decoding step of BLIP-base (~490 MB of weights) takes 57 instead of 76 ms.
    """
    out_features, in_features = weight.shape
    xs = x.reshape(1, 1, in_features).expand(parts, 1, in_features)
    blocks = weight.view(parts, out_features // parts, in_features).transpose(1, 2)  # (P, in, out/P)
    if bias is None:
        out = torch.bmm(xs, blocks)  # (P, 1, out/P)
    else:
        out = torch.baddbmm(bias.reshape(parts, 1, out_features // parts), xs, blocks)
    return out.view(*x.shape[:-1], out_features)


def _half_linear(x, weight, bias, owner, rows: int) -> torch.Tensor:
    """A bf16/fp16 product on a CPU without matrix units for it (see ``openblip.models.half``)."""
    if rows <= half.NATIVE_ROWS:
        return F.linear(x, weight, bias)
    bias32 = bias.float() if bias is not None else None
    packs = rows <= PACK_ROWS or rows >= MANY_ROWS
    if packs and owner is not None and onednn_enabled() and weight.numel() >= MIN_ENTRIES:
        out = _OP(x.float(), _packed(owner, weight, eager=True), bias32, "none", [], "")  # an fp32 copy
    else:
        out = F.linear(x.float(), weight.float(), bias32)
    return out.to(x.dtype)


class Linear(SkippableInit, nn.Linear):
    """``nn.Linear`` (same parameters and state-dict names) computed by :func:`linear`.

    Its initialisation is skipped inside ``openblip.models.skip_init.no_init``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self)
