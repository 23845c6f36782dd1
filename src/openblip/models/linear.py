"""Inference matrix products on CPU: ``F.linear`` through oneDNN.

Without gradients, on CPU, in fp32, the products of every text and image layer go through
oneDNN (PyTorch's ``mkldnn`` backend) instead of the MKL GEMM behind ``F.linear``. Measured on
a 2-core AVX2 EPYC with BLIP-base shapes (``benchmarks/results/linear_kernels.md``):

* few rows (a decoding step: one token per image or beam, at most ``PACK_ROWS`` rows): the
  weight is re-laid out once into oneDNN's blocked format and cached on the module; 8 rows
  through the 768 x 3072 FFN take 0.4 ms instead of 1.0 ms, through the 30,524-word LM head
  10 ms instead of 30 ms;
* many rows (the image encoder, cross-attention keys and values of whole images): the
  plain weight is used, no copy; ~10-15% faster.

The cached copy costs the memory of the weights it packs (the text decoder's ~550 MB at
BLIP-base size); it is rebuilt when a weight changes and never saved. Results differ from
``F.linear`` by float rounding only (~1e-6 relative). With gradients, on other devices and
dtypes, or with ``OPENBLIP_ONEDNN=0`` in the environment, ``F.linear`` is used unchanged; a
PyTorch built without oneDNN falls back to ``weight @ x^T`` for 1-4 rows, which MKL handles
better than ``F.linear``.
"""

from __future__ import annotations

import os
import weakref

import torch
import torch.nn.functional as F
from torch import nn

PACK_ROWS = 64  # up to this many rows the packed weight wins; above it the plain one is as fast
SMALL_ROWS = 4  # the fallback's few-row path (PyTorch without oneDNN)


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


def onednn_enabled() -> bool:
    """True when CPU inference products go through oneDNN (see the module docstring)."""
    return _OP is not None and os.environ.get("OPENBLIP_ONEDNN", "1") != "0"


def _packed(owner: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    try:
        version = weight._version
    except RuntimeError:  # inference tensors keep no version counter
        version = None
    key = (weight.data_ptr(), version, tuple(weight.shape))
    cached = _PACKED.get(owner)
    if cached is None or cached[0] != key:
        cached = _PACKED[owner] = (key, _REORDER(weight.detach()))
    return cached[1]


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, owner: nn.Module | None = None
) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through oneDNN for CPU fp32 inference.

    ``owner`` (the module holding ``weight``) keeps the packed copy used for few rows;
    without it few-row products use the plain weight.
    """
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if (rows == 0 or torch.is_grad_enabled() or x.device.type != "cpu"
            or x.dtype != torch.float32 or weight.dtype != torch.float32):
        return F.linear(x, weight, bias)
    if onednn_enabled():
        w = _packed(owner, weight) if owner is not None and rows <= PACK_ROWS else weight
        return _OP(x, w, bias, "none", [], "")
    if rows > SMALL_ROWS:
        return F.linear(x, weight, bias)
    xt = x.reshape(rows, x.shape[-1]).t()  # (in, rows)
    out = torch.addmm(bias[:, None], weight, xt) if bias is not None else weight @ xt  # (out, rows)
    return out.t().contiguous().view(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict names) computed by :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self)
