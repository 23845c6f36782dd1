"""What every checkpoint format shares: task layouts, key checks, pos-embed resizing,
building the model, and atomic directory writes."""

from __future__ import annotations

import copy
import logging
import os
import pickle
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch

from ..config import BlipConfig
from ..models.blip import BlipModel
from ..models.skip_init import no_init
from ..models.vit import resize_pos_embed

logger = logging.getLogger("openblip.checkpoints")

StateDict = dict[str, torch.Tensor]


class CheckpointError(ValueError):
    """A checkpoint cannot be read, or its tensors do not fit the model it describes."""


# Parts each task carries (BlipConfig fields).
TASK_PARTS: dict[str, dict[str, object]] = {
    "pretrain": dict(has_text_encoder=True, has_text_decoder=True, has_itc=True, has_itm=True, decoder_cross="image"),
    "caption": dict(has_text_encoder=False, has_text_decoder=True, has_itc=False, has_itm=False, decoder_cross="image"),
    "retrieval": dict(has_text_encoder=True, has_text_decoder=False, has_itc=True, has_itm=True),
    "vqa": dict(has_text_encoder=True, has_text_decoder=True, has_itc=False, has_itm=False, decoder_cross="question"),
    "feature": dict(has_text_encoder=True, has_text_decoder=False, has_itc=True, has_itm=False),
}
# Which tasks a checkpoint trained for one task can be loaded as. A pre-trained
# checkpoint initialises every fine-tuned model (BLIP's VQA decoder starts from the
# pre-trained image-grounded decoder), a retrieval one also serves as feature extractor.
COMPATIBLE_TASKS: dict[str, tuple[str, ...]] = {
    "pretrain": ("pretrain", "caption", "retrieval", "vqa", "feature"),
    "retrieval": ("retrieval", "feature"),
    "caption": ("caption",),
    "vqa": ("vqa",),
    "feature": ("feature",),
}
# State-dict prefixes of each optional part.
PART_PREFIXES: dict[str, tuple[str, ...]] = {
    "has_text_encoder": ("text_encoder.",),
    "has_text_decoder": ("text_decoder.",),
    "has_itc": ("vision_proj.", "text_proj.", "temp"),
    "has_itm": ("itm_head.",),
}

# Keys of official checkpoints that no inference model uses (reference E.2, I).
QUEUE_KEYS = frozenset({"image_queue", "text_queue", "queue_ptr", "idx_queue", "ptr_queue"})
DECODER_BIAS_ALIAS = "text_decoder.cls.predictions.decoder.bias"
DECODER_BIAS = "text_decoder.cls.predictions.bias"
POS_EMBED = "visual_encoder.pos_embed"


def tolerated_reason(key: str) -> str | None:
    """Why ``key`` may be ignored when the model has no such tensor, or None if it may not."""
    if key.rsplit(".", 1)[-1] == "position_ids":
        return "position_ids buffer (positions are computed)"
    if key.split(".", 1)[0].endswith("_m"):
        return "momentum copy (pre-training/retrieval training only)"
    if key in QUEUE_KEYS:
        return "ITC queue (training only)"
    if key == DECODER_BIAS_ALIAS:
        return f"alias of {DECODER_BIAS}"
    return None


def select_task(cfg: BlipConfig, source_task: str, task: str | None) -> BlipConfig:
    """A copy of ``cfg`` with the parts of ``task`` (default: the checkpoint's own)."""
    cfg = copy.deepcopy(cfg)
    task = task or source_task
    if task not in TASK_PARTS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASK_PARTS)}")
    allowed = COMPATIBLE_TASKS.get(source_task, (source_task,))
    if task not in allowed:
        raise CheckpointError(
            f"a {source_task!r} checkpoint cannot be loaded as task {task!r} (possible: {', '.join(allowed)})"
        )
    if task != source_task:
        if task == "vqa" and cfg.vision.width != cfg.text.width:
            # BLIP initialises the answer decoder's cross-attention (to the question) from
            # the pre-trained one (to the image): only possible when the widths agree.
            raise CheckpointError(
                f"cannot load this checkpoint as task 'vqa': its decoder cross-attends to {cfg.vision.width}-wide "
                f"image tokens, the VQA answer decoder to {cfg.text.width}-wide question tokens"
            )
        for name, value in TASK_PARTS[task].items():
            setattr(cfg, name, value)
        cfg.tie_encoder_decoder = cfg.tie_encoder_decoder and task == "pretrain"
    cfg.task = task
    return cfg


def drop_unused_parts(sd: StateDict, cfg: BlipConfig) -> StateDict:
    """Remove the tensors of parts ``cfg`` leaves out (a pre-trained checkpoint loaded for one task)."""
    prefixes = tuple(p for flag, ps in PART_PREFIXES.items() if not getattr(cfg, flag) for p in ps)
    if not prefixes:
        return sd
    dropped = [k for k in sd if k.startswith(prefixes)]
    if dropped:
        logger.info("task %r does not use %d tensors of this checkpoint (%s ...)", cfg.task, len(dropped), dropped[0])
    return {k: v for k, v in sd.items() if not k.startswith(prefixes)}


def resize_image_size(sd: StateDict, cfg: BlipConfig, image_size: int | None) -> None:
    """Resize ``visual_encoder.pos_embed`` in place for ``image_size`` pixels (bicubic, class slot kept)."""
    if image_size is None:
        return
    patch = cfg.vision.patch_size
    if image_size <= 0 or image_size % patch:
        raise ValueError(f"image_size must be a positive multiple of the patch size {patch}, got {image_size}")
    if POS_EMBED not in sd:
        raise CheckpointError(f"cannot resize to {image_size}px: the checkpoint has no {POS_EMBED}")
    tokens = (image_size // patch) ** 2 + 1
    if sd[POS_EMBED].shape[1] != tokens:
        sd[POS_EMBED] = resize_pos_embed(sd[POS_EMBED], tokens - 1)
        logger.info("resized %s from %dpx to %dpx", POS_EMBED, cfg.vision.image_size, image_size)
    cfg.vision.image_size = image_size


def _alias_groups(model: torch.nn.Module) -> dict[str, list[str]]:
    """State-dict names grouped by the parameter they hold (tied weights share a group)."""
    groups: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(name)
    return {names[0]: names for names in groups.values()}


def _key_list(keys: list[str], limit: int = 25) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _check_aliases(sd: StateDict, groups: Mapping[str, list[str]]) -> None:
    """Names that are one tensor in the model must hold equal tensors in the checkpoint."""
    pairs = [(names[0], n) for names in groups.values() for n in names[1:] if names[0] in sd and n in sd]
    if DECODER_BIAS_ALIAS in sd and DECODER_BIAS in sd:
        pairs.append((DECODER_BIAS, DECODER_BIAS_ALIAS))
    for a, b in pairs:
        if sd[a].shape != sd[b].shape or not torch.equal(sd[a], sd[b]):
            raise CheckpointError(f"{b} must equal {a} (they are one tensor in the model) but differs")


def check_keys(model: BlipModel, sd: StateDict, *, may_miss: tuple[str, ...] = ()) -> tuple[list[str], list[str]]:
    """``(missing, unexpected)`` keys of ``sd`` for ``model``; raises on mis-shaped or unequal tied tensors.

    A tied group (e.g. word embeddings and the LM output matrix) counts as present
    when any of its names is. Known extras (:func:`tolerated_reason`) are not unexpected.
    """
    expected = model.state_dict()
    groups = _alias_groups(model)
    misshaped = [k for k in sd if k in expected and sd[k].shape != expected[k].shape]
    if misshaped:
        shapes = (f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}" for k in misshaped[:25])
        raise CheckpointError(f"{len(misshaped)} mis-shaped tensors: " + "; ".join(shapes))
    _check_aliases(sd, groups)
    missing = [p for p, names in groups.items() if p not in may_miss and not any(n in sd for n in names)]
    extra = [k for k in sd if k not in expected]
    ignored = [k for k in extra if tolerated_reason(k)]
    if ignored:
        logger.debug("ignored %d known extra keys: %s", len(ignored), _key_list(ignored, 100))
    return missing, [k for k in extra if not tolerated_reason(k)]


def load_state(
    model: BlipModel, sd: StateDict, *, strict: bool = True, may_miss: tuple[str, ...] = (), assign: bool = False
) -> None:
    """Copy ``sd`` into ``model`` after :func:`check_keys` (with ``assign``, adopt its tensors instead).

    Mis-shaped keys always raise; missing (except ``may_miss``) and unexpected keys
    raise when ``strict`` and only warn otherwise.
    """
    missing, unexpected = check_keys(model, sd, may_miss=may_miss)
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_key_list(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_key_list(unexpected)}")
    if problems and strict:
        raise CheckpointError("checkpoint does not match the model: " + "; ".join(problems))
    for problem in problems:
        warnings.warn(f"checkpoint does not match the model (strict=False): {problem}", stacklevel=4)
    if assign:
        _adopt(model, sd)
        return
    expected = model.state_dict().keys()
    model.load_state_dict({k: v for k, v in sd.items() if k in expected}, strict=False)


def _adopt(model: torch.nn.Module, sd: StateDict) -> None:
    """Make the checkpoint's tensors the model's parameters, without copying them.

    Loading by copy holds the weights twice at its peak (the checkpoint's and the model's);
    adopting them holds them once. Each tied group gets one parameter object, so ties stay
    ties; a name the checkpoint lacks keeps the model's own tensor.
    """
    current = model.state_dict(keep_vars=True)
    for names in _alias_groups(model).values():
        source = next((sd[n] for n in names if n in sd), None)
        if source is None:
            continue
        old = current[names[0]]
        value = source.detach().to(old.dtype).contiguous()  # no copy when already so
        new = value
        if isinstance(old, torch.nn.Parameter):
            new = torch.nn.Parameter(value, requires_grad=old.requires_grad)
        for name in names:
            path, _, attr = name.rpartition(".")
            owner = model.get_submodule(path)
            if attr in owner._parameters:
                owner._parameters[attr] = new
            else:
                owner._buffers[attr] = value


def build_model(
    cfg: BlipConfig,
    sd: StateDict,
    *,
    image_size: int | None,
    strict: bool,
    may_miss: tuple[str, ...] = (),
) -> BlipModel:
    """Build ``BlipModel(cfg)`` in eval mode and load ``sd`` (resized to ``image_size``)."""
    sd = drop_unused_parts(sd, cfg)
    resize_image_size(sd, cfg, image_size)
    with no_init():  # every weight is about to be overwritten: do not draw them first
        model = BlipModel(cfg)
    if check_keys(model, sd, may_miss=may_miss)[0]:
        model = BlipModel(cfg)  # some weights keep their initial values: draw them after all
    load_state(model, sd, strict=strict, may_miss=may_miss, assign=True)
    return model.eval()


def unique_state_dict(model: torch.nn.Module) -> tuple[StateDict, dict[str, str]]:
    """The state dict with one name per tensor, and ``{dropped alias: kept name}``."""
    full = model.state_dict()
    kept: StateDict = {}
    aliases: dict[str, str] = {}
    for primary, names in _alias_groups(model).items():
        kept[primary] = full[primary].detach().contiguous()
        aliases.update({n: primary for n in names[1:]})
    return kept, aliases


@contextmanager
def atomic_directory(directory: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to ``directory`` that replaces it on success.

    On any error the temporary directory is removed and ``directory`` is untouched,
    so readers never see a half-written checkpoint.
    """
    target = Path(directory).absolute()
    if target.exists() and not overwrite and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"{target} already exists; pass overwrite=True to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        _replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(new: Path, target: Path) -> None:
    if not target.exists():
        os.replace(new, target)
        return
    # A directory cannot be renamed over a non-empty one: move the old one aside first.
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, old / "d")
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old / "d", target)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def to_dtype_device(model: BlipModel, dtype: torch.dtype | str | None, device: torch.device | str | None) -> BlipModel:
    """Move ``model``; ``dtype`` may be a torch dtype or its name (``"bfloat16"``)."""
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}")
        dtype = resolved
    return model.to(device=device, dtype=dtype)


def safe_torch_load(path: str | Path) -> dict:
    """``torch.load`` that only reads tensors and plain containers: no pickled code runs."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"refusing to load {path}: it pickles objects other than tensors and plain containers, and "
            "unpickling them could run arbitrary code (torch.load(weights_only=True) rejected it: "
            f"{str(err).splitlines()[0]}). If you trust the file, re-save its state dict, e.g. "
            "torch.save(torch.load(path, weights_only=False)['model'], 'clean.pth')"
        ) from err
