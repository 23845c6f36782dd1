"""The training loop: optimiser, schedule, precision, accumulation, logs, checkpoints.

It calls a :class:`~openblip.train.tasks.Task` on batches from a
:class:`~openblip.data.stream.WebImageTextDataset` and knows nothing about the
objectives. Everything random is either seeded per step (hard negatives) or per
sample (augmentation), or restored from the checkpoint (dropout's torch RNG), so
a run stopped at step N and resumed ends with exactly the weights of a straight run.
"""

from __future__ import annotations

import inspect
import json
import sys
import time
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from ..models.half import cpu_has_native
from . import distributed as dist
from .config import TrainConfig
from .schedule import LRScheduler
from .state import checkpoint_dirs, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .tasks import Task


class DataState:
    """Where the data stream stands: epoch and position within this rank's stream."""

    def __init__(self) -> None:
        self.epoch, self.position = 0, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def _batches(dataset, make_loader: Callable, data: DataState, skipped: Counter,
             everyone: Callable[[bool], bool] = bool) -> Iterator[dict[str, Any]]:
    """Endless batches, epoch after epoch, resuming at ``data``; empty batches are skipped.

    ``everyone(flag)`` tells whether every rank has a non-empty batch: a batch whose images all
    failed on one rank is skipped by all ranks together, so their collectives stay in step.
    """
    while True:
        dataset.set_epoch(data.epoch, data.position)
        produced = yielded = False
        whole_pass = data.position == 0
        # Creating a loader iterator draws its base seed from the global torch RNG; keep that
        # draw out of the stream that dropout uses, or resuming would shift every mask after it.
        saved = torch.get_rng_state()
        loader = iter(make_loader(dataset))
        torch.set_rng_state(saved)
        for batch in loader:
            produced = True
            data.position = batch["next_position"]
            skipped.update(batch.get("skipped", {}))
            if not everyone(len(batch["text"]) > 0):
                # Counted with the other skips; this rank's samples come back next epoch.
                skipped["other_rank_batch_unreadable"] += len(batch["text"])
                continue
            yielded = True
            yield batch
        if not produced and data.position == 0:
            raise RuntimeError("the training data produced no batch: check --train-data")
        if produced and not yielded and whole_pass:
            # A whole pass without one usable batch would otherwise repeat forever.
            raise RuntimeError(f"a whole pass over the training data gave no readable sample "
                               f"(skipped: {dict(skipped)})")
        data.epoch, data.position = data.epoch + 1, 0


def stable_idx(keys: list[str]) -> torch.Tensor:
    """Image ids from sample keys or groups, identical on every rank and run (multi-positive ITC)."""
    return torch.tensor([zlib.crc32(k.encode()) for k in keys], dtype=torch.long)


class Trainer:
    """Runs ``cfg.max_steps`` optimisation steps of ``task`` and writes ``run_dir``."""

    def __init__(self, task: Task, dataset, make_loader: Callable, cfg: TrainConfig, run_dir: str | Path,
                 info: dist.DistInfo | None = None, *, progress: bool = True) -> None:
        self.task, self.dataset, self.make_loader, self.cfg = task, dataset, make_loader, cfg
        self.run_dir = Path(run_dir)
        self.info = info or dist.DistInfo()
        self.progress = progress and self.info.is_main
        if cfg.grad_accum > 1 and not task.supports_grad_accumulation:
            raise ValueError(
                f"gradient accumulation (grad_accum={cfg.grad_accum}) would change the {cfg.task} objective: its "
                "contrastive loss uses in-batch negatives and a queue that depend on the micro-batch. Use a smaller "
                "--batch-size, more processes (torchrun), or --grad-checkpointing to fit memory instead."
            )
        if cfg.precision == "bf16" and self.info.device.type == "cpu" and not cpu_has_native(torch.bfloat16):
            warnings.warn("bf16 autocast on a CPU without bf16 matrix units (AVX512-BF16/AMX) runs on generic "
                          "kernels, several times slower than fp32 (docs/pretraining.md); use --precision fp32",
                          stacklevel=2)
        params = [p for p in task.parameters() if p.requires_grad]
        # Weight decay on every parameter, as all BLIP recipes (reference L.9).
        self.optimizer = torch.optim.AdamW(params, lr=cfg.schedule.init_lr, weight_decay=cfg.weight_decay,
                                           betas=cfg.betas)
        self.scheduler = LRScheduler(self.optimizer, cfg.schedule)
        self.step = 0
        self.data = DataState()
        self.skipped: Counter = Counter()
        self.module = task
        self.tb = self._tensorboard() if cfg.tensorboard and self.info.is_main else None
        if self.info.distributed:
            ids = [self.info.device.index] if self.info.device.type == "cuda" else None
            # Queues are identical on every rank by construction; no need to re-send them each step.
            sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(
                DistributedDataParallel.__init__).parameters else {"broadcast_buffers": False})
            self.module = DistributedDataParallel(task, device_ids=ids, **sync)

    # -- checkpoints ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "task": self.task.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "data": self.data.state_dict(),
            "skipped": dict(self.skipped),
            "rng": rng_state(),
            "world_size": self.info.world_size,
        }

    def resume(self) -> bool:
        """Load the newest complete checkpoint of this rank's run; False when there is none."""
        found = checkpoint_dirs(self.run_dir)
        if not found:
            return False
        step, path = found[-1]
        state = load_checkpoint(path)
        if state["world_size"] != self.info.world_size:
            raise ValueError(
                f"{path} was written by {state['world_size']} processes; resume with the same number "
                f"(got {self.info.world_size}) so that data positions stay exact"
            )
        if self.info.distributed:  # each rank continues its own stream with its own RNG
            state.update(state["ranks"][self.info.rank])
        self.task.load_state_dict(state["task"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.data.load_state_dict(state["data"])
        self.skipped = Counter(state["skipped"])
        self.step = int(state["step"])
        set_rng_state(state["rng"])
        self._log_line({"event": "resume", "step": self.step, "checkpoint": str(path)})
        return True

    def save(self) -> None:
        state = self.state_dict()
        # Rank 0 writes the model and its state; other ranks only their data position and RNG.
        states = dist.gather_objects({"data": state["data"], "rng": state["rng"], "skipped": state["skipped"]})
        if self.info.is_main:
            state["ranks"] = states
            save_checkpoint(self.run_dir, self.step, self.task.model, self.task.tokenizer, state,
                            self.cfg.keep_checkpoints)
        dist.barrier()

    # -- the loop ---------------------------------------------------------------------
    def fit(self, stop_at: int | None = None) -> dict[str, float]:
        """Train to ``cfg.max_steps``, or stop early after step ``stop_at`` with a checkpoint
        (to fit a job's time limit; a later ``resume`` continues the same schedule)."""
        cfg = self.cfg
        end = min(cfg.max_steps, stop_at) if stop_at else cfg.max_steps
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.info.is_main:
            (self.run_dir / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        self.task.train()
        batches = _batches(self.dataset, self.make_loader, self.data, self.skipped,
                           lambda ok: dist.all_ranks(ok, self.info.device))
        last: dict[str, float] = {}
        bar = self._bar()
        tick, seen = time.perf_counter(), 0
        while self.step < end:
            lr = self.scheduler.step(self.step)
            totals: dict[str, float] = {}
            for micro in range(cfg.grad_accum):
                batch = next(batches)
                sync = micro == cfg.grad_accum - 1 or not self.info.distributed
                with self._autocast(), (nullcontext() if sync else self.module.no_sync()):
                    out = self._forward(batch, micro)
                    (out["loss"] / cfg.grad_accum).backward()
                for k, v in out.items():
                    totals[k] = totals.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
                seen += len(batch["text"])
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_([p for p in self.task.parameters() if p.requires_grad], cfg.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            last = {"lr": lr, **totals}
            if self.step % cfg.log_every == 0 or self.step == end:
                elapsed = time.perf_counter() - tick
                rate = seen * self.info.world_size / max(elapsed, 1e-9)
                self._log_line({"step": self.step, "epoch": self.data.epoch, **last, "samples_per_s": round(rate, 2),
                                "skipped": dict(self.skipped)})
                tick, seen = time.perf_counter(), 0
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{totals['loss']:.3f}", lr=f"{lr:.2e}")
            if self.step % cfg.save_every == 0 or self.step == end:
                self.save()
        if bar is not None:
            bar.close()
        return last

    def _forward(self, batch: dict[str, Any], micro: int) -> dict[str, torch.Tensor]:
        device = self.info.device
        pixels = batch["image"].to(device, non_blocking=True)
        idx = stable_idx(batch.get("group", batch["key"])) if self.task.with_idx else None
        # Hard negatives drawn from a generator seeded by (seed, step, rank): exact on resume.
        gen = torch.Generator(device=device)
        gen.manual_seed(hash((self.cfg.seed, self.step, micro, self.info.rank)) & 0x7FFFFFFF)
        return self.module(pixels, batch["text"], step=self.step, idx=idx, generator=gen)

    def _autocast(self):
        if self.cfg.precision == "bf16":
            return torch.autocast(device_type=self.info.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _bar(self):
        if not self.progress:
            return None
        from tqdm import tqdm

        return tqdm(total=self.cfg.max_steps, initial=self.step, desc=self.cfg.task, unit="step", file=sys.stderr,
                    dynamic_ncols=True)

    def _tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ValueError("--tensorboard needs the tensorboard package: pip install tensorboard") from exc
        return SummaryWriter(str(self.run_dir / "tensorboard"))

    def _log_line(self, record: dict[str, Any]) -> None:
        if not self.info.is_main:
            return
        if self.tb is not None and "step" in record:
            for key, value in record.items():
                if isinstance(value, float):
                    self.tb.add_scalar(f"train/{key}", value, record["step"])
            self.tb.flush()
        with open(self.run_dir / "log.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
