"""Fetching model directories from the Hugging Face Hub, failing fast when it is unreachable.

The cache is tried first (``local_files_only``), so a cached model needs no network.
Otherwise one metadata request with a short timeout (``HF_HUB_ETAG_TIMEOUT``,
default 10 s) tells whether the Hub answers before anything is downloaded; the
files then go through ``huggingface_hub.snapshot_download`` into HF's cache.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from huggingface_hub import HfApi, constants, snapshot_download
from huggingface_hub.utils import (
    GatedRepoError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from .common import CheckpointError, logger
from .hf import WEIGHT_FILES

try:  # huggingface_hub >= 1.x
    from huggingface_hub.errors import IncompleteSnapshotError
except ImportError:  # pragma: no cover - older huggingface_hub
    IncompleteSnapshotError = LocalEntryNotFoundError  # type: ignore[misc,assignment]

# Small files every supported repository layout may need (configs, tokenizer, processor).
METADATA_FILES = [
    "config.json",
    "openblip_config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class HubUnavailableError(ConnectionError):
    """The Hugging Face Hub cannot be reached and the model is not in the local cache."""


def looks_like_hub_id(source: str) -> bool:
    """``owner/name`` that is not a weight-file path (``a/model.pth``)."""
    return bool(_HUB_ID.match(source)) and ".." not in source and not source.endswith((".pth", ".pt", ".bin"))


def _offline() -> bool:
    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return flag or bool(constants.HF_HUB_OFFLINE)


def _has_weights(folder: Path) -> bool:
    return any((folder / name).is_file() for name in WEIGHT_FILES)


def _from_cache(repo_id: str, revision: str | None) -> Path | None:
    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=METADATA_FILES, local_files_only=True)
    except (LocalEntryNotFoundError, IncompleteSnapshotError, FileNotFoundError):
        return None
    return Path(folder) if _has_weights(Path(folder)) else None


def _unreachable(repo_id: str, err: BaseException) -> HubUnavailableError:
    return HubUnavailableError(
        f"cannot download {repo_id!r}: the Hugging Face Hub ({constants.ENDPOINT}) is unreachable "
        f"({type(err).__name__}: {err}) and the model is not in the local cache ({constants.HF_HUB_CACHE}). "
        "Pass a local directory instead (a transformers BLIP directory, an openblip directory or an official "
        ".pth file), download it where the Hub is reachable (`hf download "
        f"{repo_id}`) and copy the HF cache over, or set HF_HUB_OFFLINE=1 to use only cached models."
    )


def _weight_patterns(files: set[str]) -> list[str]:
    """Download one weight format only: safetensors if the repository has it."""
    for single, index, shards in (
        ("model.safetensors", "model.safetensors.index.json", "model-*.safetensors"),
        ("pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*.bin"),
    ):
        if single in files:
            return [single]
        if index in files:
            return [index, shards]
    raise CheckpointError(f"the repository has no model weights ({', '.join(WEIGHT_FILES)})")


def fetch(repo_id: str, revision: str | None = None) -> Path:
    """Local snapshot directory of ``repo_id`` (cache first, then the Hub).

    Raises:
        HubUnavailableError: not cached and the Hub does not answer within
            ``HF_HUB_ETAG_TIMEOUT`` seconds (or ``HF_HUB_OFFLINE`` is set).
        CheckpointError: the repository or revision does not exist, is gated, or has no weights.
    """
    cached = _from_cache(repo_id, revision)
    if cached is not None:
        logger.debug("using cached snapshot %s", cached)
        return cached
    if _offline():
        raise HubUnavailableError(
            f"{repo_id!r} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is "
            "set; unset it to download, or pass a local model directory or .pth file"
        )
    timeout = float(constants.HF_HUB_ETAG_TIMEOUT)
    try:
        info = HfApi().model_info(repo_id, revision=revision, timeout=timeout)
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as err:
        raise CheckpointError(
            f"{repo_id!r} (revision {revision or 'main'}) is not available on the Hugging Face Hub: {err}. "
            "Check the id; private or gated repositories need `hf auth login`."
        ) from err
    except Exception as err:  # connection, DNS, timeout, proxy or server errors all mean "unreachable"
        raise _unreachable(repo_id, err) from err
    patterns = METADATA_FILES + _weight_patterns({s.rfilename for s in info.siblings or []})
    try:
        folder = snapshot_download(repo_id, revision=info.sha, allow_patterns=patterns, etag_timeout=timeout)
    except Exception as err:
        raise _unreachable(repo_id, err) from err
    return Path(folder)
