"""Load and convert BLIP checkpoints: transformers/Hub, official Salesforce ``.pth``, openblip.

Formats (see :func:`detect_format`):

* ``hf``: a transformers BLIP directory or Hub id (``Salesforce/blip-image-captioning-base``):
  ``config.json`` whose ``architectures`` name ``BlipForConditionalGeneration``
  (task ``caption``), ``BlipForImageTextRetrieval`` (``retrieval``) or
  ``BlipForQuestionAnswering`` (``vqa``), weights in ``model.safetensors`` or
  ``pytorch_model.bin``, tokenizer files.
* ``official``: a Salesforce ``.pth`` (``{"model": state_dict}`` or a bare state dict),
  read with ``torch.load(weights_only=True)``; the architecture is inferred from shapes.
* ``openblip``: ``openblip_config.json`` + ``model.safetensors`` + tokenizer files,
  written by :func:`save_model`.

Every tensor is checked: a missing, unexpected or mis-shaped key is an error naming
the keys. This deliberately departs from the original ``load_checkpoint``, which
silently dropped mis-shaped tensors and loaded with ``strict=False`` (reference L.11),
turning a width or vocabulary mismatch into random weights. ``strict=False`` only
downgrades missing/unexpected keys to warnings; mis-shaped keys stay errors.

Known extras ignored (logged at debug level): ``*.position_ids`` buffers, momentum
copies (``visual_encoder_m.*``, ``text_encoder_m.*``, ``vision_proj_m.*``,
``text_proj_m.*``), the ITC queues (``image_queue``, ``text_queue``, ``queue_ptr``,
``idx_queue``, ``ptr_queue``), ``text_decoder.cls.predictions.decoder.bias`` (must
equal ``.bias``) and ``...decoder.weight`` (must equal the word embeddings). Parts a
chosen ``task`` does not use (e.g. the encoder of a pre-trained checkpoint loaded
for captioning) are dropped at info level.

transformers' retrieval models have no ITC temperature: ``temp`` keeps its initial
0.07 (``has_itc`` stays True so ITC scores are available) and
``cfg.extra["source"]["temp_initialised"]`` records it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ..config import BlipConfig
from ..models.blip import BlipModel
from ..tokenizer import BlipTokenizer
from . import hf, hub, native, official
from .common import (
    CheckpointError,
    StateDict,
    build_model,
    select_task,
    to_dtype_device,
)
from .hub import HubUnavailableError
from .native import save_model

__all__ = [
    "CheckpointError",
    "HubUnavailableError",
    "convert",
    "detect_format",
    "load_model",
    "save_model",
]

logger = logging.getLogger("openblip.checkpoints")


def detect_format(source: str | Path) -> str:
    """``"openblip"``, ``"hf"`` or ``"official"`` for a local path; ``"hub"`` for a Hub id.

    A local path wins over a Hub id of the same spelling.

    Raises:
        FileNotFoundError: neither an existing path nor an ``owner/name`` Hub id.
        CheckpointError: a directory in no supported format.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        if native.is_openblip_dir(path):
            return "openblip"
        if hf.is_hf_dir(path):
            return "hf"
        raise CheckpointError(
            f"{path} is neither an openblip directory ({native.CONFIG_FILE}) nor a transformers BLIP "
            "directory (config.json with a Blip* architecture)"
        )
    if path.is_file():
        return "official"
    if isinstance(source, str) and hub.looks_like_hub_id(source):
        return "hub"
    raise FileNotFoundError(f"{source}: no such file or directory, and not a Hugging Face Hub id (owner/name)")


def _read(path: Path, fmt: str) -> tuple[BlipConfig, StateDict, str, dict[str, Any], BlipTokenizer]:
    """``(config, state dict, checkpoint task, provenance, tokenizer)`` of a local source."""
    if fmt == "openblip":
        cfg, sd = native.read_openblip_dir(path)
        return cfg, sd, cfg.task, {}, hf.load_tokenizer(path)
    if fmt == "hf":
        cfg, sd, arch = hf.read_hf_dir(path)
        info: dict[str, Any] = {"architecture": arch}
        if cfg.has_itc and "temp" not in sd:
            info["temp_initialised"] = True
        return cfg, sd, cfg.task, info, hf.load_tokenizer(path)
    sd = official.read_state_dict(path)
    cfg = official.infer_config(sd)
    return cfg, sd, cfg.task, {}, BlipTokenizer.default()


def load_model(
    source: str | Path,
    *,
    image_size: int | None = None,
    task: str | None = None,
    revision: str | None = None,
    strict: bool = True,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    grounded_first_token: str | None = None,
) -> tuple[BlipModel, BlipTokenizer]:
    """Load a BLIP model (in eval mode) and its tokenizer from any supported source.

    Args:
        source: Hub id, transformers or openblip directory, or official ``.pth`` file.
        image_size: resize the position embeddings (bicubic, class slot kept) to this
            many pixels at load time, as BLIP does (e.g. 224 -> 384).
        task: load only the parts of this task (``caption``, ``retrieval``, ``vqa``,
            ``feature``, ``pretrain``); default: the checkpoint's own task. A
            pre-trained checkpoint can be loaded as any task.
        revision: Hub branch, tag or commit (Hub ids only).
        strict: False turns missing/unexpected keys into warnings (mis-shapes still raise).
        dtype, device: where the returned model lives.
        grounded_first_token: ``"enc"`` or ``"cls"`` for image-grounded text; default:
            the stored value (``"enc"``, as BLIP trained; transformers' ITM/VQA use ``"cls"``).

    Returns:
        ``(model, tokenizer)``; ``model.cfg.task`` is the task and
        ``model.cfg.extra["source"]`` records where the weights came from.

    Raises:
        CheckpointError: unreadable file, unsupported layout, or key mismatch.
        HubUnavailableError: a Hub id that is not cached while the Hub is unreachable.
    """
    if grounded_first_token not in (None, "enc", "cls"):
        raise ValueError(f"grounded_first_token must be 'enc' or 'cls', got {grounded_first_token!r}")
    fmt = detect_format(source)
    where: dict[str, Any] = {"location": str(source)}
    if fmt == "hub":
        path = hub.fetch(str(source), revision)
        where = {"repo_id": str(source), "revision": revision or "main", "commit": path.name}
        fmt = detect_format(path)
    elif revision is not None:
        raise ValueError("revision applies only to Hugging Face Hub ids, not to local paths")
    else:
        path = Path(source).expanduser()
    cfg, sd, source_task, info, tokenizer = _read(path, fmt)
    if len(tokenizer) > cfg.text.vocab_size:
        logger.warning("tokenizer has %d tokens, the model %d embeddings", len(tokenizer), cfg.text.vocab_size)
    cfg = select_task(cfg, source_task, task)
    if grounded_first_token is not None:
        cfg.grounded_first_token = grounded_first_token
    cfg.extra.setdefault("source", {"format": fmt, **where, "task": source_task, **info})
    may_miss = ("temp",) if info.get("temp_initialised") else ()
    model = build_model(cfg, sd, image_size=image_size, strict=strict, may_miss=may_miss)
    return to_dtype_device(model, dtype, device), tokenizer


def convert(
    src: str | Path,
    dst: str | Path,
    *,
    format: str = "openblip",
    image_size: int | None = None,
    task: str | None = None,
    revision: str | None = None,
    strict: bool = True,
    overwrite: bool = False,
) -> Path:
    """Read any supported checkpoint and write it to ``dst`` (atomically).

    ``format="openblip"`` writes the openblip format (every task); ``format="hf"``
    writes a transformers directory (config.json with ``architectures``,
    model.safetensors under transformers' names, tokenizer and processor files),
    which exists only for ``caption``, ``retrieval`` and ``vqa`` models: pick one of
    those with ``task`` for a pre-trained checkpoint. ``image_size`` resizes the
    position embeddings first. Backs ``openblip convert SRC DST [--to] [--image-size]``.

    Returns:
        ``Path(dst)``.
    """
    if format not in ("openblip", "hf"):
        raise ValueError(f"format must be 'openblip' or 'hf', got {format!r}")
    model, tokenizer = load_model(src, image_size=image_size, task=task, revision=revision, strict=strict)
    if format == "hf":
        return hf.write_hf_dir(model, tokenizer, dst, overwrite=overwrite)
    return save_model(model, tokenizer, dst, overwrite=overwrite)
