#!/usr/bin/env python
"""Prepare a CapFilt throughput measurement: random-weight captioner and filter of a model
preset, and a few input shards cut from an existing shard set.

    python scripts/capfilt_throughput_setup.py --preset base --source /tmp/full/fashion-mnist/test-00000.tar \\
        --images 256 --out /tmp/tp-base

writes OUT/captioner, OUT/filter (openblip directories) and OUT/input/part-{00000..00003}.tar.
Throughput does not depend on the weights when every caption has the same length, so run
``openblip capfilt`` with ``--min-length L --max-length L`` (docs/capfilt.md has the commands)
and read ``throughput`` in OUTPUT/summary.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path

import torch

from openblip.checkpoints import save_model
from openblip.config import preset
from openblip.data.shards import expand_urls, iter_samples, write_shard
from openblip.models.blip import BlipModel
from openblip.tokenizer import BlipTokenizer

PARTS = {"captioner": dict(task="caption", has_text_encoder=False, has_itc=False, has_itm=False),
         "filter": dict(task="retrieval", has_text_decoder=False)}


def write_models(name: str, out: Path, seed: int = 0) -> None:
    """OUT/captioner and OUT/filter: the preset's architecture with random weights."""
    for role, parts in PARTS.items():
        torch.manual_seed(seed)
        save_model(BlipModel(preset(name, **parts)), BlipTokenizer.default(), out / role, overwrite=True)


def write_inputs(source: str, images: int, shards: int, out: Path) -> list[str]:
    """The first `images` samples of `source`, spread over `shards` shards (for 1 or 2 processes)."""
    samples = (s for group in expand_urls(source) for p in group for s in iter_samples(p))
    chosen = [{k: v for k, v in s.items() if k != "__shard__"} for s in itertools.islice(samples, images)]
    per = math.ceil(len(chosen) / shards)
    paths = []
    for i in range(shards):
        path = out / "input" / f"part-{i:05d}.tar"
        write_shard(path, chosen[i * per : (i + 1) * per])
        paths.append(str(path))
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help="model preset: tiny, base, large (default: tiny)")
    p.add_argument("--source", required=True, help="shards to take the input images from")
    p.add_argument("--images", type=int, default=256, help="input images (default: 256)")
    p.add_argument("--shards", type=int, default=4, help="input shards (default: 4)")
    p.add_argument("--out", required=True, help="output folder")
    args = p.parse_args(argv)
    out = Path(args.out)
    write_models(args.preset, out)
    paths = write_inputs(args.source, args.images, args.shards, out)
    print(json.dumps({"captioner": str(out / "captioner"), "filter": str(out / "filter"),
                      "input": str(out / "input" / f"part-{{00000..{len(paths) - 1:05d}}}.tar")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
