#!/usr/bin/env python
"""Split a shard set into a clean "human" subset and a "web" set with swapped captions.

    python scripts/make_noisy_split.py /tmp/full/fashion-mnist/train-{00000..00005}.tar /tmp/fm-noisy \\
        --human-size 5000 --fraction 0.3 --class-key label

writes OUT/human-*.tar, OUT/web-*.tar and OUT/split.json (see openblip.capfilt.noise).
"""

from __future__ import annotations

import argparse
import json
import sys

from openblip.capfilt.noise import NoiseSettings, make_noisy_split


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="input shards: brace pattern, glob, directory, '::' lists")
    p.add_argument("output", help="output directory")
    p.add_argument("--human-size", type=int, default=5000, help="clean samples taken first (default: 5000)")
    p.add_argument("--web-size", type=int, default=None, help="web samples after them (default: all the rest)")
    p.add_argument("--fraction", type=float, default=0.3, help="share of web captions swapped (default: 0.3)")
    p.add_argument("--class-key", default=None,
                   help="json field of the class; a swapped caption comes from another class (default: only "
                        "a different caption)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--human-shards", type=int, default=2)
    p.add_argument("--web-shards", type=int, default=8)
    p.add_argument("--calibration-size", type=int, default=0,
                   help="clean samples after the web set, held out in calibration-00000.tar (default: 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier split in OUTPUT")
    args = p.parse_args(argv)
    try:
        settings = NoiseSettings(args.human_size, args.web_size, args.fraction, args.seed, args.class_key,
                                 args.human_shards, args.web_shards, args.calibration_size)
        result = make_noisy_split(args.source, args.output, settings, overwrite=args.overwrite)
    except (OSError, ValueError) as exc:
        print(f"make_noisy_split: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
