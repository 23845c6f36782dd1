#!/usr/bin/env python
"""Precision/recall of CapFilt's filter on a controlled-noise web set.

    python scripts/capfilt_precision_recall.py OUTPUT/capfilt            # a CapFilt output directory
    python scripts/capfilt_precision_recall.py OUTPUT/capfilt/manifest.jsonl --flags 'split/web-*.tar'

The positive class is "a swapped web caption" (json "noisy": true, written by
scripts/make_noisy_split.py); a web caption the filter removed is a positive prediction.
The flags are read from the shards next to the manifest (CapFilt copies the input json),
or from --flags. Prints a JSON report, then a Markdown table row.

    python scripts/capfilt_precision_recall.py OUTPUT/capfilt --thresholds 0.5,0.3,0.2 --header

re-decides the web texts at other ITM thresholds (one row each, from the recorded scores) and
reports the ROC AUC of the ITM and ITC scores for "clean above swapped".
"""

from __future__ import annotations

import argparse
import bisect
import json
import sys
from pathlib import Path

from openblip.capfilt.noise import (
    MARKDOWN_HEADER,
    capfilt_precision_recall,
    markdown_row,
    read_capfilt_decisions,
    read_noise_flags,
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("manifest", metavar="MANIFEST_OR_OUTPUT_DIR",
                   help="CapFilt manifest.jsonl/.parquet or output directory")
    p.add_argument("--flags", default=None,
                   help="shards holding the noisy flags (default: the *.tar beside the manifest)")
    p.add_argument("--header", action="store_true", help="print the Markdown table header before the row")
    p.add_argument("--thresholds", default=None, help="comma-separated ITM thresholds to re-decide at")
    args = p.parse_args(argv)
    path = Path(args.manifest)
    folder = path if path.is_dir() else path.parent
    try:
        flags = read_noise_flags(args.flags or str(folder / "*.tar"))
        decisions = list(read_capfilt_decisions(path))
        result = capfilt_precision_recall(decisions, flags)
    except (OSError, ValueError) as exc:
        print(f"capfilt_precision_recall: error: {exc}", file=sys.stderr)
        return 2
    if not flags:
        print("capfilt_precision_recall: error: no sample carries a 'noisy' flag", file=sys.stderr)
        return 2
    result["markdown"] = markdown_row(result)
    print(json.dumps(result, indent=2))
    if args.header:
        print(MARKDOWN_HEADER)
    print(result["markdown"])
    if args.thresholds:
        print(json.dumps({"auc": {score: roc_auc(decisions, flags, score) for score in ("itm", "itc")}}))
        for threshold in (float(t) for t in args.thresholds.split(",")):
            again = [{**d, "kept": d["itm"] >= threshold} for d in decisions]
            print(f"| {threshold:g} " + markdown_row(capfilt_precision_recall(again, flags)))
    return 0


def roc_auc(decisions, flags, score: str) -> float | None:
    """P(a clean web text scores above a swapped one), ties counted half."""
    clean = sorted(d[score] for d in decisions if d["source"] == "web" and flags.get(str(d["key"])) is False)
    swapped = sorted(d[score] for d in decisions if d["source"] == "web" and flags.get(str(d["key"])) is True)
    if not clean or not swapped:
        return None
    # For each clean score: swapped scores below it, plus half of those equal to it.
    above = sum((bisect.bisect_left(swapped, c) + bisect.bisect_right(swapped, c)) / 2 for c in clean)
    return round(above / (len(clean) * len(swapped)), 4)


if __name__ == "__main__":
    sys.exit(main())
