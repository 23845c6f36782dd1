"""openblip's own format: ``openblip_config.json`` (:meth:`BlipConfig.to_dict`),
``model.safetensors`` under the original BLIP names, and tokenizer files."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .. import __version__
from ..config import BlipConfig
from ..models.blip import BlipModel
from ..tokenizer import BlipTokenizer
from .common import StateDict, atomic_directory, unique_state_dict

CONFIG_FILE = "openblip_config.json"
WEIGHTS_FILE = "model.safetensors"


def is_openblip_dir(directory: Path) -> bool:
    return (directory / CONFIG_FILE).is_file()


def save_model(
    model: BlipModel, tokenizer: BlipTokenizer, directory: str | Path, *, overwrite: bool = False
) -> Path:
    """Write ``model`` and ``tokenizer`` to ``directory`` in the openblip format.

    The directory is written next to its final place and renamed into it, so a
    failure leaves no partial checkpoint (and an existing one, with ``overwrite``,
    intact). Tied tensors (decoder output matrix, encoder/decoder sharing) are
    stored once; loading re-ties them by building the model from its config.

    Raises:
        FileExistsError: ``directory`` exists, is not empty, and ``overwrite`` is False.
    """
    tensors, aliases = unique_state_dict(model)
    metadata = {"format": "pt", "openblip_version": __version__, "aliases": json.dumps(aliases, sort_keys=True)}
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        model.cfg.save(tmp / CONFIG_FILE)
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata=metadata)
        tokenizer.save_pretrained(tmp)
    return Path(directory)


def read_openblip_dir(directory: Path) -> tuple[BlipConfig, StateDict]:
    """``(config, state dict)`` of an openblip directory.

    Tensors stored once for several names (encoder/decoder sharing, tied output
    matrix) come back under every name, so that loading only some parts (e.g. a
    pre-trained model as a captioner, which has no encoder) still finds them.
    """
    weights = str(directory / WEIGHTS_FILE)
    sd = load_file(weights)
    with safe_open(weights, framework="pt") as f:
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    for alias, kept in aliases.items():
        if kept in sd and alias not in sd:
            sd[alias] = sd[kept]
    return BlipConfig.load(directory / CONFIG_FILE), sd
