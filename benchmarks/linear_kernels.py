"""CPU inference products at BLIP-base shapes: ``F.linear`` against ``openblip.models.linear``.

    python benchmarks/linear_kernels.py [--preset base] [--repeats 20] [--out benchmarks/results/linear_kernels.md]

For each weight shape of a model preset (at BLIP-base size: the text layers' 768 x 768, the ViT's
fused QKV 768 x 2304, the FFN's 768 x 3072 and 3072 x 768, the 30,524-word LM head) and each row count (1 and 3: a
decoding step on one image with greedy or 3 beams; 8 and 24: the same at batch 8; 48: 3 beams at
batch 16; 1154: a ViT layer on 2 images at 384 px, which stays with F.linear), it times
``F.linear`` (the MKL GEMM) and openblip's ``linear`` with the module owning the weight (oneDNN
with the weight packed once and cached, for 2-64 rows) and reports the max difference. Under ``torch.inference_mode()``, torch's default
thread count, median of the repeats after warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from openblip.config import preset
from openblip.models.linear import Linear, linear, onednn_enabled

ROWS = [1, 3, 8, 24, 48, 1154]


def median_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="base", help="model preset whose weight shapes are measured")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default="benchmarks/results/linear_kernels.md")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    cfg = preset(args.preset)
    w, vw, vocab = cfg.text.width, cfg.vision.width, cfg.text.vocab_size
    shapes = [(w, w), (vw, 3 * vw), (w, cfg.text.intermediate_size), (cfg.text.intermediate_size, w), (w, vocab)]
    lines = ["# CPU inference products: F.linear vs openblip.models.linear", "",
             f"Command: `python benchmarks/linear_kernels.py --preset {args.preset} --repeats {args.repeats}`  ",
             (f"torch {torch.__version__} ({torch.get_num_threads()} threads), CPU capability "
              f"{torch.backends.cpu.get_cpu_capability()}, oneDNN path enabled: {onednn_enabled()}"), "",
             "| in x out | rows | F.linear ms | openblip ms | speed-up | max abs diff |", "|---|---|---|---|---|---|"]
    with torch.inference_mode():
        for fan_in, fan_out in shapes:
            layer = Linear(fan_in, fan_out, bias=fan_out != vocab)
            for rows in ROWS:
                x = torch.randn(rows, fan_in)
                repeats = max(3, args.repeats // 4) if rows > 100 or fan_out == vocab else args.repeats
                ref = median_ms(lambda x=x, m=layer: F.linear(x, m.weight, m.bias), repeats)
                ours = median_ms(lambda x=x, m=layer: linear(x, m.weight, m.bias, m), repeats)
                diff = (linear(x, layer.weight, layer.bias, layer) - F.linear(x, layer.weight, layer.bias)).abs().max()
                lines.append(f"| {fan_in} x {fan_out} | {rows} | {ref:.2f} | {ours:.2f} | {ref / ours:.2f}x | "
                             f"{diff.item():.1e} |")
                print(lines[-1], flush=True)
    lines += ["", ("Median wall milliseconds per product after 3 warm-up calls; the LM head and "
                   "1154-row products are repeated a quarter as often.")]
    with open(args.out, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
