"""Training configuration: one typed dataclass, named presets as JSON, CLI overrides."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .schedule import ScheduleConfig

TRAIN_PRESETS = "openblip.presets.train"


@dataclass
class TrainConfig:
    """Everything a training run needs besides the data and the output folder."""

    task: str = "pretrain"  # pretrain | caption | retrieval
    model: str = "tiny"  # model preset name, or a checkpoint to start from
    # Changes to a model preset (``model`` names one): {"vision": {"patch_size": 8}, "embed_dim": 64}.
    model_config: dict[str, Any] | None = None
    init_text: str | None = None  # BERT checkpoint (HF format) for the text side
    init_vision: str | None = None  # timm/DeiT ViT weights for the image side
    image_size: int | None = None  # training resolution (default: the model's)
    max_steps: int = 1000
    batch_size: int = 32  # per process
    grad_accum: int = 1
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    samples_per_epoch: int | None = None  # per process; sets epochs for schedules and alpha ramp
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = None
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    grad_checkpointing: bool = False
    # Objectives.
    queue_size: int = 57600
    momentum: float = 0.995
    alpha: float = 0.4
    alpha_ramp_epochs: float = 2.0  # pre-training ramps over 2 epochs, retrieval over 1
    alpha_ramp_steps: int | None = None  # overrides the epoch ramp when set
    text_max_length: int = 30
    prompt: str = "a picture of "
    label_smoothing: float = 0.1
    # Data.
    min_scale: float = 0.2  # RandomResizedCrop scale (0.2 pre-training, 0.5 fine-tuning)
    randaugment: bool = True
    max_words: int = 30
    num_workers: int = 2
    train_data_weights: str | None = None
    # Retrieval and pre-training: samples whose json holds the same value of this field are
    # positives of each other in ITC and never ITM hard negatives (``image_id``; a class label when
    # captions describe a class). None: each sample key is its own image (pre-training: the
    # original's diagonal positives).
    positive_key: str | None = None
    # Bookkeeping.
    seed: int = 0
    log_every: int = 10
    save_every: int = 500
    keep_checkpoints: int = 2
    tensorboard: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.schedule, dict):
            self.schedule = ScheduleConfig(**self.schedule)
        self.betas = tuple(self.betas)
        if self.task not in ("pretrain", "caption", "retrieval"):
            raise ValueError(f"unknown task {self.task!r}: use pretrain, caption or retrieval")
        if self.model_config is not None and not isinstance(self.model_config, dict):
            raise ValueError(f"model_config must be a JSON object such as {{\"embed_dim\": 64}}, "
                             f"got {self.model_config!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {self.precision!r}")
        for name in ("max_steps", "batch_size", "grad_accum", "save_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown training settings: {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)

    def replace(self, **changes: Any) -> "TrainConfig":
        """A copy with ``changes``; ``schedule`` entries may be given as ``schedule.<field>``."""
        data = self.to_dict()
        for key, value in changes.items():
            if value is None:
                continue
            if key.startswith("schedule."):
                data["schedule"][key.split(".", 1)[1]] = value
            elif key.startswith("model_config."):
                # model_config.vision.patch_size=8 -> {"vision": {"patch_size": 8}}
                node = data["model_config"] = dict(data.get("model_config") or {})
                *parents, leaf = key.split(".")[1:]
                for part in parents:
                    node[part] = node = dict(node.get(part) or {})
                node[leaf] = value
            else:
                data[key] = value
        return TrainConfig.from_dict(data)


def list_train_presets() -> list[str]:
    files = resources.files(TRAIN_PRESETS).iterdir()
    return sorted(f.name[: -len(".json")] for f in files if f.name.endswith(".json"))


def load_train_config(name_or_path: str) -> TrainConfig:
    """A named preset (``tiny``, ``base``, ``large``, ``caption-base``...) or a JSON file."""
    path = Path(name_or_path)
    if path.suffix == ".json" and path.exists():
        return TrainConfig.from_dict(json.loads(path.read_text()))
    if name_or_path not in list_train_presets():
        raise ValueError(
            f"unknown training config {name_or_path!r}: not a JSON file and not a preset "
            f"({', '.join(list_train_presets())})"
        )
    text = resources.files(TRAIN_PRESETS).joinpath(f"{name_or_path}.json").read_text()
    return TrainConfig.from_dict(json.loads(text))


def parse_override(item: str) -> tuple[str, Any]:
    """``key=value`` with the value read as JSON when it parses (numbers, true, null...)."""
    if "=" not in item:
        raise ValueError(f"--set expects key=value, got {item!r}")
    key, raw = item.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value
