"""Checkpoints of a training run: atomic, self-contained, exactly resumable.

Layout of a run folder (itself loadable with ``openblip.load(RUN_DIR)``)::

    RUN_DIR/openblip_config.json, model.safetensors, tokenizer files   latest weights
    RUN_DIR/train_config.json                                           resolved settings
    RUN_DIR/log.jsonl                                                   one line per logged step
    RUN_DIR/checkpoints/step-00000020/training_state.pt                  task + optimizer + RNG + data
    RUN_DIR/checkpoints/step-00000020/openblip_config.json ...           the model at that step

Each checkpoint folder is written under a temporary name and renamed when
complete, so a killed job never leaves a half checkpoint that resume would read.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoints import save_model

STATE_FILE = "training_state.pt"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": _numpy_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(tuple(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_state() -> list[Any]:
    # Plain types only, so the file loads with torch.load(weights_only=True).
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]


def _restore_numpy(state: list[Any]) -> tuple:
    name, keys, pos, has_gauss, gauss = state
    return (name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss)


def checkpoint_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def save_checkpoint(run_dir: Path, step: int, model, tokenizer, state: dict[str, Any], keep: int) -> Path:
    """Write ``checkpoints/step-N`` atomically, refresh the run's top-level weights, prune old ones."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tokenizer, tmp)
    torch.save(state, tmp / STATE_FILE)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    _publish(final, run_dir)
    for _, old in checkpoint_dirs(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _publish(checkpoint: Path, run_dir: Path) -> None:
    """Copy the checkpoint's model files to the run folder, each replaced atomically."""
    for src in checkpoint.iterdir():
        if src.name == STATE_FILE or not src.is_file():
            continue
        tmp = run_dir / f".{src.name}.tmp"
        shutil.copyfile(src, tmp)
        tmp.replace(run_dir / src.name)


def load_checkpoint(path: Path) -> dict[str, Any]:
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    state["rng"]["numpy"] = _restore_numpy(state["rng"]["numpy"])
    return state
