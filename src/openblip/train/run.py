"""Assemble a training run from a :class:`TrainConfig`: model, task, data, loop.

Used by ``openblip pretrain`` / ``openblip finetune`` and callable from Python::

    from openblip.train.run import train
    train(load_train_config("tiny").replace(max_steps=100), "shards/train-{00000..00003}.tar", "runs/tiny")
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..config import preset
from ..data.convert import annotations_to_shards, is_annotation_source
from ..data.stream import WebImageTextDataset, make_loader
from ..models.blip import BlipModel
from ..models.med import Attention
from ..tokenizer import BlipTokenizer
from ..transforms import train_transform
from . import distributed as dist
from .config import TrainConfig
from .init_weights import load_bert, load_vit, text_config_from_bert
from .loop import Trainer
from .tasks import CaptionTask, PretrainTask, RetrievalTask, Task

# Parts each task trains; a checkpoint is loaded with only these.
TASK_PARTS = {
    "pretrain": dict(task="pretrain"),
    "caption": dict(task="caption", has_text_encoder=False, has_itc=False, has_itm=False),
    "retrieval": dict(task="retrieval", has_text_decoder=False),
}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_model(cfg: TrainConfig) -> tuple[BlipModel, BlipTokenizer]:
    """A model preset (random, or from BERT/ViT weights) or a checkpoint to continue from."""
    from ..config import list_presets

    if cfg.model in list_presets():
        overrides = {**(cfg.model_config or {}), **TASK_PARTS[cfg.task]}
        if cfg.init_text:
            overrides["text"] = text_config_from_bert(cfg.init_text).__dict__
        if cfg.image_size:
            overrides["vision"] = {**overrides.get("vision", {}), "image_size": cfg.image_size}
        model = BlipModel(preset(cfg.model, **overrides))
        if cfg.init_text:
            load_bert(model, cfg.init_text)
        if cfg.init_vision:
            load_vit(model, cfg.init_vision)
        tokenizer = BlipTokenizer.default()
    else:
        if cfg.model_config:
            raise ValueError(f"model_config changes a model preset; {cfg.model!r} is a checkpoint")
        from ..checkpoints import load_model

        model, tokenizer = load_model(cfg.model, task=cfg.task, image_size=cfg.image_size)
    set_text_dropout(model, 0.1)
    return model, tokenizer


def set_text_dropout(model: nn.Module, p: float) -> None:
    """BERT's training dropout (0.1) in the text transformer, whatever the checkpoint says."""
    for name in ("text_encoder", "text_decoder"):
        part = getattr(model, name, None)
        if part is None:
            continue
        for module in part.modules():
            if isinstance(module, nn.Dropout):
                module.p = p
            elif isinstance(module, Attention):
                module.dropout = p


def steps_per_epoch(cfg: TrainConfig) -> int:
    """Optimiser steps per epoch: from ``samples_per_epoch``, else the run is spread over the
    schedule's epochs so that epoch-based schedules still make sense."""
    if cfg.samples_per_epoch:
        return max(1, math.ceil(cfg.samples_per_epoch / (cfg.batch_size * cfg.grad_accum)))
    return max(1, cfg.max_steps // max(cfg.schedule.epochs, 1))


def build_task(cfg: TrainConfig, model: BlipModel, tokenizer: BlipTokenizer, epoch_steps: int) -> Task:
    ramp = cfg.alpha_ramp_steps or max(1, int(cfg.alpha_ramp_epochs * epoch_steps))
    if cfg.task == "pretrain":
        return PretrainTask(model, tokenizer, queue_size=cfg.queue_size, momentum=cfg.momentum, alpha=cfg.alpha,
                            alpha_ramp_steps=ramp, max_length=cfg.text_max_length,
                            label_smoothing=cfg.label_smoothing, with_idx=cfg.positive_key is not None)
    if cfg.task == "retrieval":
        return RetrievalTask(model, tokenizer, queue_size=cfg.queue_size, momentum=cfg.momentum, alpha=cfg.alpha,
                             alpha_ramp_steps=ramp, max_length=cfg.text_max_length)
    return CaptionTask(model, tokenizer, prompt=cfg.prompt, max_length=cfg.text_max_length,
                       label_smoothing=cfg.label_smoothing)


def resolve_train_data(train_data: str, run_dir: Path, info: dist.DistInfo) -> str:
    """Shards as given; a JSON annotation list or an image folder with a JSONL/CSV is
    converted once into ``RUN_DIR/data/`` (by rank 0) and its shards are used."""
    sources = train_data.split("::")
    resolved = []
    for i, source in enumerate(sources):
        if is_annotation_source(source):
            target = run_dir / "data" / f"source-{i}"
            if info.is_main:
                annotations_to_shards(source, target)
            dist.barrier()
            source = annotations_to_shards(source, target)  # reads the finished conversion
        resolved.append(source)
    return "::".join(resolved)


def build_dataset(cfg: TrainConfig, train_data: str, image_size: int, info: dist.DistInfo) -> WebImageTextDataset:
    transform = train_transform(image_size, min_scale=cfg.min_scale, randaugment=cfg.randaugment)
    return WebImageTextDataset(
        train_data,
        transform,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        rank=info.rank,
        world_size=info.world_size,
        max_words=cfg.max_words,
        samples_per_epoch=cfg.samples_per_epoch,
        weights=cfg.train_data_weights,
        group_key=cfg.positive_key,
        # Every rank must contribute equal batches to the feature all-gather.
        drop_last=info.distributed,
    )


def train(cfg: TrainConfig, train_data: str, output: str | Path, *, resume: bool = False,
          info: dist.DistInfo | None = None, progress: bool = True, stop_at: int | None = None) -> dict[str, float]:
    """Run (or resume) a training run; returns the last step's logged values.

    ``stop_at`` ends the run early after that step with a checkpoint, as a job
    that hits its time limit; ``resume=True`` later continues it exactly.
    """
    info = info or dist.DistInfo()
    output = Path(output)
    if not resume and (output / "checkpoints").is_dir() and any((output / "checkpoints").iterdir()):
        raise FileExistsError(f"{output} already holds checkpoints; pass --resume to continue it or pick a new --output")
    seed_everything(cfg.seed)
    model, tokenizer = build_model(cfg)
    model.to(info.device)
    if cfg.grad_checkpointing:
        for part in (model.visual_encoder, getattr(model, "text_encoder", None), getattr(model, "text_decoder", None)):
            if part is not None:
                (part.bert if hasattr(part, "bert") else part).grad_checkpointing = True
    epoch_steps = steps_per_epoch(cfg)
    cfg = cfg.replace(**{"schedule.steps_per_epoch": epoch_steps})
    task = build_task(cfg, model, tokenizer, epoch_steps).to(info.device)
    train_data = resolve_train_data(train_data, output, info)
    dataset = build_dataset(cfg, train_data, model.cfg.vision.image_size, info)
    trainer = Trainer(task, dataset, lambda ds: make_loader(ds, num_workers=cfg.num_workers), cfg, output, info,
                      progress=progress)
    if resume:
        trainer.resume()
    return trainer.fit(stop_at=stop_at)
