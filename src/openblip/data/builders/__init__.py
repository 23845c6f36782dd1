"""Builders that turn locally installed (Debian-packaged) datasets into WebDataset shards."""

from .common import MissingPackageError

__all__ = ["MissingPackageError"]
