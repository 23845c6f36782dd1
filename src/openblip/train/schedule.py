"""Learning-rate schedules as pure functions of the global step.

Every schedule is ``lr = f(step)``: nothing accumulates, so resuming only needs the step. The
shipped BLIP configs use two of them (reference B.4, L.10):

* ``"step"`` (pretraining): in epoch 0 a per-step linear warm-up from ``warmup_lr`` to
  ``init_lr`` over ``warmup_steps`` (then held at ``init_lr``); from epoch 1 on, a per-epoch step
  decay ``max(min_lr, init_lr * decay_rate ** epoch)`` (utils.py:8-18). As in the original, a
  warm-up longer than epoch 0 is cut short when epoch 1 starts.
* ``"cosine_epoch"`` (every fine-tune): cosine from ``init_lr`` to ``min_lr`` over ``epochs``,
  constant within an epoch, no warm-up (utils.py:2-6).

Two per-step variants are added for new recipes: ``"cosine"`` and ``"warmup_cosine"``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

__all__ = [
    "ScheduleConfig",
    "LRScheduler",
    "lr_at",
    "warmup_step_decay_lr",
    "cosine_epoch_lr",
    "cosine_lr",
    "warmup_cosine_lr",
]

ScheduleName = Literal["step", "cosine_epoch", "cosine", "warmup_cosine"]


@dataclass
class ScheduleConfig:
    """Learning-rate schedule; defaults are BLIP pretraining (configs/pretrain.yaml)."""

    name: ScheduleName = "step"
    init_lr: float = 3e-4  # peak LR, reached at the end of warm-up
    min_lr: float = 1e-6  # floor of the step decay; end point of the cosines (0 in fine-tunes)
    warmup_lr: float = 1e-6  # LR at step 0 of the warm-up
    warmup_steps: int = 3000  # linear warm-up length in steps ("step", "warmup_cosine")
    decay_rate: float = 0.9  # per-epoch factor of "step" (the paper says 0.85, the config 0.9)
    epochs: int = 20  # cosine length in epochs ("cosine_epoch") and total length of per-step cosines
    steps_per_epoch: int = 1  # iterations per epoch; maps a global step to its epoch

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch


def _linear_warmup(step: int, warmup_steps: int, warmup_lr: float, init_lr: float) -> float:
    # min() keeps the LR at init_lr once the warm-up is over (utils.py:8-12).
    if warmup_steps <= 0:
        return init_lr
    return min(init_lr, warmup_lr + (init_lr - warmup_lr) * step / warmup_steps)


def _half_cosine(progress: float, init_lr: float, min_lr: float) -> float:
    progress = min(max(progress, 0.0), 1.0)
    return min_lr + (init_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_step_decay_lr(
    step: int, steps_per_epoch: int, *, init_lr: float, min_lr: float, warmup_lr: float, warmup_steps: int,
    decay_rate: float,
) -> float:
    """BLIP pretraining: warm-up within epoch 0, then ``max(min_lr, init_lr * decay_rate ** epoch)``."""
    epoch = step // steps_per_epoch
    if epoch == 0:
        return _linear_warmup(step, warmup_steps, warmup_lr, init_lr)
    return max(min_lr, init_lr * decay_rate**epoch)


def cosine_epoch_lr(step: int, steps_per_epoch: int, *, init_lr: float, min_lr: float, epochs: int) -> float:
    """Fine-tuning cosine evaluated at the start of the step's epoch (constant within an epoch)."""
    epoch = step // steps_per_epoch
    return _half_cosine(epoch / epochs, init_lr, min_lr)


def cosine_lr(step: int, total_steps: int, *, init_lr: float, min_lr: float) -> float:
    """Per-step cosine from ``init_lr`` at step 0 to ``min_lr`` at ``total_steps`` (held after)."""
    return _half_cosine(step / max(total_steps, 1), init_lr, min_lr)


def warmup_cosine_lr(
    step: int, total_steps: int, *, init_lr: float, min_lr: float, warmup_lr: float, warmup_steps: int
) -> float:
    """Linear warm-up to ``init_lr`` over ``warmup_steps``, then per-step cosine to ``min_lr``."""
    if step < warmup_steps:
        return _linear_warmup(step, warmup_steps, warmup_lr, init_lr)
    decay_steps = max(total_steps - warmup_steps, 1)
    return _half_cosine((step - warmup_steps) / decay_steps, init_lr, min_lr)


def lr_at(step: int, cfg: ScheduleConfig) -> float:
    """Learning rate of global step ``step`` (0-based) under ``cfg``."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if cfg.steps_per_epoch <= 0 or cfg.epochs <= 0:
        raise ValueError("steps_per_epoch and epochs must be positive")
    if cfg.name == "step":
        return warmup_step_decay_lr(
            step, cfg.steps_per_epoch, init_lr=cfg.init_lr, min_lr=cfg.min_lr, warmup_lr=cfg.warmup_lr,
            warmup_steps=cfg.warmup_steps, decay_rate=cfg.decay_rate,
        )
    if cfg.name == "cosine_epoch":
        return cosine_epoch_lr(step, cfg.steps_per_epoch, init_lr=cfg.init_lr, min_lr=cfg.min_lr, epochs=cfg.epochs)
    if cfg.name == "cosine":
        return cosine_lr(step, cfg.total_steps, init_lr=cfg.init_lr, min_lr=cfg.min_lr)
    if cfg.name == "warmup_cosine":
        return warmup_cosine_lr(
            step, cfg.total_steps, init_lr=cfg.init_lr, min_lr=cfg.min_lr, warmup_lr=cfg.warmup_lr,
            warmup_steps=cfg.warmup_steps,
        )
    raise ValueError(f"unknown schedule {cfg.name!r}")


class LRScheduler:
    """Sets an optimizer's learning rate from :func:`lr_at` at each step.

    Call ``step(global_step)`` (or ``step()`` for the next one) before ``optimizer.step()``. A
    param group's optional ``"lr_scale"`` entry multiplies its LR (for layer-wise or per-module
    rates). The state is just the last step, so resuming is exact.

    Args:
        optimizer: any ``torch.optim.Optimizer``.
        cfg: the schedule.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: ScheduleConfig) -> None:
        self.optimizer = optimizer
        self.cfg = cfg
        self.last_step = -1

    def step(self, step: int | None = None) -> float:
        """Apply the LR of ``step`` (default: the step after the last one) and return it."""
        self.last_step = self.last_step + 1 if step is None else step
        lr = lr_at(self.last_step, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        # The config is not saved: the one given at construction wins, so a resumed run may
        # change it (e.g. train longer) and the LR follows from the step alone.
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the step and re-apply its LR so the optimizer matches after loading."""
        self.last_step = int(state["last_step"])
        if self.last_step >= 0:
            self.step(self.last_step)
