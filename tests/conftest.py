"""Shared pytest fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def hf_blip(tmp_path_factory):
    """Factory ``hf_blip(kind, **make_hf_blip_kwargs) -> (directory, hf_model, hf_processor)``.

    Builds each distinct tiny transformers BLIP once per test session (see
    ``tests/helpers_hf.py``); callers must not modify the returned model or directory.
    """
    from helpers_hf import make_hf_blip

    cache: dict[tuple, tuple] = {}

    def build(kind: str, **kwargs):
        key = (kind, tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = make_hf_blip(kind, tmp_path_factory.mktemp(f"hf-{kind}"), **kwargs)
        return cache[key]

    return build
