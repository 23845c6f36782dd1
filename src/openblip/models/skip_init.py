"""Building a model whose every weight is about to be read from a checkpoint, without drawing it first.

Random initialisation of BLIP-base draws ~225M numbers twice (PyTorch's default in each layer's
constructor, then BLIP's own scheme): 3.6 of the 4.6 s that loading a checkpoint took. Inside
:func:`no_init`, openblip's layers (:class:`~openblip.models.linear.Linear`, :class:`Embedding`,
:class:`Conv2d`, the ViT and BERT initialisers) allocate their weights and leave them unset. Only
checkpoint loading uses it, and only when the checkpoint holds every weight that would be left unset
(otherwise the model is built again, initialised). The flag is per thread.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

_state = threading.local()


@contextmanager
def no_init() -> Iterator[None]:
    """Layers built in this block (in this thread) skip their random initialisation."""
    previous = getattr(_state, "skip", False)
    _state.skip = True
    try:
        yield
    finally:
        _state.skip = previous


def init_skipped() -> bool:
    """True inside :func:`no_init`."""
    return getattr(_state, "skip", False)


class SkippableInit:
    """Mixin for a torch layer: its ``reset_parameters`` does nothing inside :func:`no_init`."""

    def reset_parameters(self) -> None:
        if not init_skipped():
            super().reset_parameters()  # type: ignore[misc]


class Embedding(SkippableInit, nn.Embedding):
    """``nn.Embedding`` whose initialisation :func:`no_init` can skip."""


class Conv2d(SkippableInit, nn.Conv2d):
    """``nn.Conv2d`` whose initialisation :func:`no_init` can skip."""
