"""Where greedy captioning time goes: the image encoder against the whole caption, both sides.

    python benchmarks/caption_breakdown.py [--repeats 3] [--out benchmarks/results/caption_breakdown.md]

Same BLIP-base model and photos as ``caption_throughput.py`` (random weights built with transformers,
loaded by openblip). For batch 1 and 8 it times, interleaved and repeated: the ViT alone
(transformers ``vision_model`` / openblip ``encode_image``) and whole greedy captioning. The ViT is the
same matrix products on both sides, so ``transformers total / openblip ViT`` bounds the speed-up any
decoder could give: even a decoder taking no time at all could not beat it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from caption_throughput import (  # noqa: E402
    build_hf_model, hf_runner, load_openblip, load_pixels, log, machine_info, ob_runner, save_hf_dir,
)


def timed(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each function: one warm-up each, then ``repeats`` interleaved rounds.

    Interleaving (order rotated per round) keeps the slow drifts of a shared machine from
    landing on one side only.
    """
    for fn in fns.values():
        fn()
    names, times = list(fns), {name: [] for name in fns}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


def after(t: dict[str, float], side: str) -> float:
    """Seconds of a side's greedy captioning spent after its image encoder."""
    return t[f"{side} greedy"] - t[f"{side} ViT"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/caption_breakdown.md")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    hf = build_hf_model()
    rows = []
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        save_hf_dir(hf, tmp)
        blip = load_openblip(tmp, "fp32", 0)
        pixels = load_pixels(8, 384)
        for bs in (1, 8):
            batches = [pixels[:bs]] if bs == 8 else [pixels[i : i + 1] for i in range(2)]
            n = sum(len(b) for b in batches)
            t = timed({
                "transformers ViT": lambda: [hf.vision_model(pixel_values=b) for b in batches],
                "openblip ViT": lambda: [blip.model.encode_image(b) for b in batches],
                "transformers greedy": hf_runner(hf, batches, 1, 5),
                "openblip greedy": ob_runner(blip, batches, 1, 5),
            }, args.repeats)
            log(f"batch {bs}: " + ", ".join(f"{k} {v:.2f} s" for k, v in t.items()))
            rows.append((bs, n, t))
    info = machine_info()
    md = ["# Greedy captioning: image encoder against the whole caption", "",
          f"Command: `python benchmarks/caption_breakdown.py --repeats {args.repeats}`  ",
          f"Machine: {info.get('cpu', '?')}, torch {torch.__version__} ({torch.get_num_threads()} threads)", "",
          "| batch | images | transformers ViT s | openblip ViT s | transformers greedy s | openblip greedy s "
          "| ViT share (openblip) | greedy ratio | after the ViT: ratio | bound: transformers greedy / openblip ViT |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for bs, n, t in rows:
        md.append(f"| {bs} | {n} | {t['transformers ViT']:.2f} | {t['openblip ViT']:.2f} | "
                  f"{t['transformers greedy']:.2f} | {t['openblip greedy']:.2f} | "
                  f"{t['openblip ViT'] / t['openblip greedy']:.0%} | "
                  f"{t['transformers greedy'] / t['openblip greedy']:.2f}x | "
                  f"{after(t, 'transformers') / after(t, 'openblip'):.2f}x | "
                  f"{t['transformers greedy'] / t['openblip ViT']:.2f}x |")
    md += ["", "Median of the timed rounds after one warm-up each, the four measurements interleaved (order "
           "rotated per round); batch 1 captions 2 images one at a time, batch 8 captions 8 at once (the cells of "
           "`caption_throughput.py`). \"After the ViT\" is greedy minus ViT time on each side: the image "
           "cross-attention set-up and the decoding steps."]
    with open(args.out, "w", encoding="utf-8") as f:
        f.write("\n".join(md) + "\n")
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
