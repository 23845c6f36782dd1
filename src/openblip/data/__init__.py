"""Data pipelines: WebDataset shards, annotation files, and dataset builders.

* `shards`: shard lists (brace expansion, ``::`` sources), reading, atomic writing.
* `stream`: `WebImageTextDataset`, the deterministic, resumable training stream.
* `annotations`: map-style datasets from JSON/JSONL/CSV, retrieval evaluation sets.
* `builders` and `cli`: ``openblip data fashion-mnist|openclipart``.
"""

from .annotations import (
    ImageTextDataset,
    ResumableSampler,
    RetrievalEvalSet,
    collate_skip_none,
    load_retrieval_json,
    load_retrieval_shards,
)
from .shards import ShardWriter, atomic_write, expand_braces, expand_urls, iter_samples, parse_weights, write_shard
from .stream import WebImageTextDataset, make_loader, split_captions, transform_with_rng

__all__ = [
    "ImageTextDataset",
    "ResumableSampler",
    "RetrievalEvalSet",
    "ShardWriter",
    "WebImageTextDataset",
    "atomic_write",
    "collate_skip_none",
    "expand_braces",
    "expand_urls",
    "iter_samples",
    "load_retrieval_json",
    "load_retrieval_shards",
    "make_loader",
    "parse_weights",
    "split_captions",
    "transform_with_rng",
    "write_shard",
]
