"""Dense matmul peak of this machine, in GFLOP/s, for fp32 and bf16.

The denominator of the model FLOP utilisation (MFU) reported by
``benchmarks/train_throughput.py``: the best median rate of square ``torch.mm``
calls over a few sizes and the three operand layouts a linear layer's training
step uses (``nt`` forward, ``nn`` input gradient, ``tn`` weight gradient), with
torch's default thread count unless ``--threads`` is given. An ``n x n`` by
``n x n`` product counts ``2 n^3`` FLOPs. Sizes whose single call would take
over ``--max-call-s`` are skipped, so a slow kernel (e.g. bf16 on a CPU without
native bf16 support, where torch falls back to a generic gemm) stays quick to
measure; the JSON lists every layout and size.

    python benchmarks/matmul_peak.py                       # fp32 and bf16, sizes 1024 2048 4096
    python benchmarks/matmul_peak.py --dtypes bf16 --sizes 4096 --repeats 20 --out peak.json

From Python (with ``benchmarks/`` on ``sys.path``)::

    from matmul_peak import measure_peak
    measure_peak(torch.bfloat16)   # GFLOP/s
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def dtype_of(name_or_dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(name_or_dtype, torch.dtype):
        return name_or_dtype
    if name_or_dtype not in DTYPES:
        raise ValueError(f"unknown dtype {name_or_dtype!r}: use {', '.join(DTYPES)}")
    return DTYPES[name_or_dtype]


# Operand layouts, as BLAS names them: "nt" is nn.Linear's forward (x @ W.T), "nn" its input
# gradient (g @ W), "tn" its weight gradient (g.T @ x). Optimised kernels run all three at the
# same rate; a fallback kernel (e.g. bf16 without native CPU support) may not.
LAYOUTS = ("nn", "nt", "tn")


def _operands(dtype: torch.dtype, size: int, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(dtype)
    b = torch.randn(size, size, generator=gen).to(dtype)
    return (a.t() if layout[0] == "t" else a), (b.t() if layout[1] == "t" else b)


def matmul_rate(dtype: str | torch.dtype, size: int, layout: str = "nn", *, warmup: int = 3, repeats: int = 10,
                max_total_s: float = 10.0) -> float:
    """Median GFLOP/s of ``torch.mm`` on two ``size x size`` matrices of ``dtype`` in ``layout``.

    Slow calls cut the work: warm-up stops after a call of over a second, and the repeats
    are capped so that they take about ``max_total_s`` (at least 3)."""
    dtype = dtype_of(dtype)
    a, b = _operands(dtype, size, layout)
    out = torch.empty(size, size, dtype=dtype)
    for _ in range(max(warmup, 1)):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        if time.perf_counter() - start > 1.0:
            break
    times: list[float] = []
    while len(times) < max(repeats, 1):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        times.append(time.perf_counter() - start)
        if len(times) >= 3 and sum(times) > max_total_s:
            break
    return 2 * size**3 / statistics.median(times) / 1e9


def measure_rates(dtype: str | torch.dtype, sizes: tuple[int, ...] = (1024, 2048, 4096), *,
                  layouts: tuple[str, ...] = LAYOUTS, warmup: int = 3, repeats: int = 10,
                  max_call_s: float = 3.0) -> dict[str, dict[str, float | None]]:
    """GFLOP/s by layout and size. Sizes go up; a size whose single call is projected (from the
    previous size's rate) to take over ``max_call_s`` is skipped (``None``), so that a slow kernel
    costs seconds, not hours. The first size is always measured."""
    rates: dict[str, dict[str, float | None]] = {}
    for layout in layouts:
        rates[layout] = {}
        last = None
        for n in sorted(sizes):
            if last is not None and 2 * n**3 / (last * 1e9) > max_call_s:
                rates[layout][str(n)] = None
                continue
            last = matmul_rate(dtype, n, layout, warmup=warmup, repeats=repeats)
            rates[layout][str(n)] = round(last, 2)
    return rates


def measure_peak(dtype: str | torch.dtype, sizes: tuple[int, ...] = (1024, 2048, 4096), *,
                 layouts: tuple[str, ...] = LAYOUTS, warmup: int = 3, repeats: int = 10,
                 max_call_s: float = 3.0) -> float:
    """This machine's dense matmul peak in GFLOP/s for ``dtype``: the best median rate over
    ``sizes`` and operand ``layouts`` (see :func:`measure_rates`)."""
    rates = measure_rates(dtype, sizes, layouts=layouts, warmup=warmup, repeats=repeats, max_call_s=max_call_s)
    return max(r for by_size in rates.values() for r in by_size.values() if r is not None)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _safe(fn):
    try:
        return fn()
    except Exception:  # older/newer torch without the probe
        return None


def machine() -> dict[str, object]:
    return {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": _safe(lambda: torch.backends.cpu.get_cpu_capability()),
        "mkldnn_bf16": _safe(lambda: bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--sizes", nargs="+", type=int, default=[1024, 2048, 4096])
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--max-call-s", type=float, default=3.0,
                        help="skip a size whose single call is projected to take longer than this")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", default=None, help="also write the JSON to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict[str, dict[str, object]] = {}
    for name in args.dtypes:
        rates = measure_rates(name, tuple(args.sizes), layouts=tuple(args.layouts), warmup=args.warmup,
                              repeats=args.repeats, max_call_s=args.max_call_s)
        best = max(r for by_size in rates.values() for r in by_size.values() if r is not None)
        results[name] = {"gflops_by_layout_and_size": rates, "peak_gflops": best}
    report = {"machine": machine(), "warmup": args.warmup, "repeats": args.repeats, "results": results,
              "command": " ".join(["python"] + sys.argv)}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return report


if __name__ == "__main__":
    main()
