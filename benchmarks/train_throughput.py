r"""Pre-training throughput and model FLOP utilisation (MFU) of BLIP on this machine.

For each preset and precision this builds the model and :class:`PretrainTask`
exactly as ``openblip pretrain`` does (``build_model`` / ``build_task`` with the
preset's training config: queue size, momentum, dropout, grad clipping, grad
checkpointing), then times full optimiser steps on random images at the
preset's resolution and 10-word captions padded to 30 tokens as BLIP does:

    forward (ITC with momentum encoders and queue + ITM with hard negatives + LM),
    backward, gradient clipping when the config has it, AdamW step.

``warmup`` untimed steps come first; the reported time is the median of the timed
steps. ``bf16`` runs the step under ``torch.autocast(device, dtype=torch.bfloat16)``,
as the training loop's ``--precision bf16``.

MFU = achieved model FLOP/s / measured dense matmul peak of the same dtype
(``benchmarks/matmul_peak.py``: fp32 peak for fp32, bf16 peak for bf16).

Model FLOPs (counted analytically, per sample; a matmul of an (m x k) by a (k x n)
operand is 2*m*k*n FLOPs; elementwise work, norms, softmax, embeddings lookups,
the EMA update and AdamW are not counted). Notation: ViT width Dv, depth Lv, MLP
width Mv, patch p, image tokens Nv = 1 + (S/p)^2; text width Dt, depth Lt, FFN
width Mt, vocabulary V, padded text length L (30), scored LM tokens T per sample
(real tokens after [DEC], i.e. those whose next-token target is not padding),
ITC embedding width E, contrast candidates K = B + queue size.

* ViT pass:         2*(3p^2 Dv)*(Nv-1)  +  Lv * [2*(4Dv^2 + 2 Dv Mv)*Nv + 4*Nv^2*Dv]
* unimodal text:    Lt * [2*(4Dt^2 + 2 Dt Mt)*L + 4*L^2*Dt]               (ITC text encoder)
* grounded text:    Lt * [2*(6Dt^2 + 2 Dt Mt)*L + 2*(2 Dc Dt)*Nv + 4*L^2*Dt + 4*L*Nv*Dt]
                    (self-attention q,k,v,o + cross-attention q,o + FFN on L tokens, cross-attention
                    keys/values from Nv image tokens of width Dc = Dv, scores/values over L and Nv keys)
* ITM:              3 grounded passes per sample (positive, negative image, negative text: the
                    task encodes 3B texts, each against its own copy of the image tokens)
* decoder (LM):     1 grounded pass (causal self-attention is counted as full L x L, which is
                    what the masked attention computes) + LM head 2*(Dt^2 + Dt V)*T
                    (transform + tied vocabulary projection on scored positions only, as the task)
* heads:            projections 2 Dv E + 2 Dt E, ITM head 3 * 2*Dt*2
* ITC similarities: online features against K candidates, both directions: 2 * 2EK
* momentum passes:  ViT + unimodal text + projections, forward only; plus the no-grad similarities
                    (momentum features against K candidates, 2 * 2EK, and against the batch, 2 * 2EB)

trained FLOPs = 3 x forward (backward = 2 x forward: gradients of inputs and weights) for every
matmul of the trained model, except where only one operand needs a gradient (the patch embedding,
whose input is the pixels, and the ITC similarities, whose candidates are momentum features):
there backward = 1 x forward. Momentum passes count forward only. Activation recomputation
(grad checkpointing, used by the ``large`` config) is not counted: this is MFU, not hardware FLOP
utilisation. The matmul weight counts above are checked against the built model's
``nn.Linear``/``nn.Conv2d`` weights before timing.

The counts agree with ``torch.utils.flop_counter.FlopCounterMode`` on a real step (tiny +0.3%,
base +1.9%: the counter does not see the ViT's fused CPU attention kernel, which the formula counts).

    python benchmarks/matmul_peak.py --out benchmarks/results/matmul_peak.json
    python benchmarks/train_throughput.py --runs tiny:fp32 tiny:bf16 base:fp32 --batch-size 8 --steps 5 \
        --peak-json benchmarks/results/matmul_peak.json --json benchmarks/results/train_throughput.json
    python benchmarks/train_throughput.py   # tiny and base x fp32 and bf16, measuring the peak first

Where torch has no native bf16 matmul for the CPU (``oneDNN bf16: False`` in the report), bf16 runs
on a generic kernel that is far slower than fp32; ``--max-minutes`` (per run) then cuts the steps.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shlex
import statistics
import sys
import time
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from matmul_peak import machine, measure_peak  # noqa: E402

from openblip.config import BlipConfig  # noqa: E402
from openblip.train.config import load_train_config  # noqa: E402
from openblip.train.run import build_model, build_task, seed_everything, steps_per_epoch  # noqa: E402

DEFAULT_OUT = "benchmarks/results/train_throughput.md"

# Sentence parts for "real-looking" 10-word captions, all single BERT word pieces:
# "a <adj> <noun> <verb> <prep> the <adj> <noun> at <time>".
_ADJ = ["small", "large", "red", "white", "black", "young", "old", "wooden", "green", "busy", "quiet", "brown"]
_NOUN = ["dog", "cat", "man", "woman", "child", "horse", "car", "bird", "boat", "table", "bench", "street",
         "train", "tree", "house", "river", "field", "kitchen", "beach", "bicycle"]
_VERB = ["sitting", "standing", "walking", "running", "parked", "lying", "waiting", "playing", "looking", "resting"]
_PREP = ["on", "near", "by", "under", "behind", "beside", "in", "across"]
_TIME = ["night", "sunset", "dawn", "noon", "dusk", "midnight", "home", "school", "work", "sea"]


def make_captions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [
        f"a {rng.choice(_ADJ)} {rng.choice(_NOUN)} {rng.choice(_VERB)} {rng.choice(_PREP)} "
        f"the {rng.choice(_ADJ)} {rng.choice(_NOUN)} at {rng.choice(_TIME)}"
        for _ in range(n)
    ]


# -- model FLOPs ----------------------------------------------------------------------


def matmul_weights(cfg: BlipConfig) -> dict[str, int]:
    """Weights that enter matmuls, per part, as the FLOP formula counts them."""
    v, t = cfg.vision, cfg.text
    text_layer = 4 * t.width**2 + 2 * t.width * t.intermediate_size
    cross = 2 * t.width**2 + 2 * v.width * t.width
    dec_cross = 2 * t.width**2 + 2 * cfg.decoder_cross_width * t.width
    return {
        "visual_encoder": 3 * v.patch_size**2 * v.width + v.depth * (4 * v.width**2 + 2 * v.width * v.mlp_dim),
        "text_encoder": t.depth * (text_layer + cross),
        "text_decoder": t.depth * (text_layer + dec_cross) + t.width**2 + t.width * t.vocab_size,
        "vision_proj": v.width * cfg.embed_dim,
        "text_proj": t.width * cfg.embed_dim,
        "itm_head": t.width * 2,
    }


def check_matmul_weights(model: nn.Module, cfg: BlipConfig) -> None:
    """The analytic weight counts must match the built model's Linear/Conv2d weights."""
    expected = matmul_weights(cfg)
    for name, count in expected.items():
        part = getattr(model, name)
        found = sum(m.weight.numel() for m in part.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
        if found != count:
            raise AssertionError(f"{name}: the FLOP formula counts {count} matmul weights, the model has {found}")


def model_flops(cfg: BlipConfig, *, text_len: int, scored_tokens: float, queue_size: int,
                batch_size: int) -> dict[str, float]:
    """Model FLOPs per sample of one pre-training step, by part (see the module docstring)."""
    v, t, e = cfg.vision, cfg.text, cfg.embed_dim
    nv, length = v.num_patches + 1, text_len
    k = batch_size + queue_size

    patch = 2 * 3 * v.patch_size**2 * v.width * v.num_patches
    vit_blocks = v.depth * (2 * (4 * v.width**2 + 2 * v.width * v.mlp_dim) * nv + 4 * nv * nv * v.width)
    text_layer = 4 * t.width**2 + 2 * t.width * t.intermediate_size
    unimodal = t.depth * (2 * text_layer * length + 4 * length * length * t.width)

    def grounded(cross_width: int) -> int:
        return t.depth * (
            2 * (text_layer + 2 * t.width**2) * length  # self-attn q,k,v,o + cross q,o + FFN on text tokens
            + 2 * (2 * cross_width * t.width) * nv  # cross-attention keys/values from image tokens
            + 4 * length * length * t.width  # self-attention scores + values
            + 4 * length * nv * t.width  # cross-attention scores + values
        )

    projections = 2 * v.width * e + 2 * t.width * e
    itm = 3 * (grounded(v.width) + 2 * t.width * 2)
    decoder = grounded(cfg.decoder_cross_width)
    lm_head = 2 * (t.width**2 + t.width * t.vocab_size) * scored_tokens
    itc_online = 2 * 2 * e * k
    momentum = patch + vit_blocks + unimodal + projections + 2 * 2 * e * k + 2 * 2 * e * batch_size

    # 3x (forward + backward of inputs and weights); 2x where only one operand needs a gradient.
    parts = {
        "vit": 2 * patch + 3 * vit_blocks,
        "text_unimodal": 3 * unimodal,
        "itm_grounded": 3 * itm,
        "decoder": 3 * decoder,
        "lm_head": 3 * lm_head,
        "projections_itc": 3 * projections + 2 * itc_online,
        "momentum_fwd": momentum,
    }
    parts["total"] = sum(parts.values())
    parts["forward_trained"] = patch + vit_blocks + unimodal + itm + decoder + lm_head + projections + itc_online
    return {name: float(x) for name, x in parts.items()}


# -- timing ---------------------------------------------------------------------------


class Bench:
    """One preset in one precision, built as ``openblip pretrain`` builds it; ``step(i)`` runs
    and times one full optimiser step on a fixed random batch."""

    def __init__(self, preset: str, precision: str, batch_size: int, seed: int = 0) -> None:
        cfg = load_train_config(preset).replace(batch_size=batch_size, precision=precision, seed=seed)
        seed_everything(cfg.seed)
        model, tokenizer = build_model(cfg)
        if cfg.grad_checkpointing:  # as openblip.train.run.train
            for part in (model.visual_encoder, getattr(model, "text_encoder", None),
                         getattr(model, "text_decoder", None)):
                if part is not None:
                    (part.bert if hasattr(part, "bert") else part).grad_checkpointing = True
        epoch_steps = steps_per_epoch(cfg)
        self.cfg = cfg = cfg.replace(**{"schedule.steps_per_epoch": epoch_steps})
        self.task = build_task(cfg, model, tokenizer, epoch_steps)
        self.task.train()
        check_matmul_weights(model, model.cfg)
        self.params = [p for p in self.task.parameters() if p.requires_grad]
        # As openblip.train.loop.Trainer.
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.schedule.init_lr, weight_decay=cfg.weight_decay,
                                           betas=cfg.betas)
        self.preset, self.precision, self.batch_size = preset, precision, batch_size
        self.image_size = size = model.cfg.vision.image_size
        self.pixels = torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(seed))
        self.captions = make_captions(batch_size, seed)
        enc = tokenizer(self.captions, max_length=cfg.text_max_length, padding="max_length", first_token="cls")
        self.text_len = int(enc["input_ids"].shape[1])
        self.scored = float(enc["attention_mask"][:, 1:].sum()) / batch_size  # LM targets per sample
        self.flops = model_flops(model.cfg, text_len=self.text_len, scored_tokens=self.scored,
                                 queue_size=cfg.queue_size, batch_size=batch_size)

    def autocast(self):
        if self.precision == "bf16":  # as the training loop's --precision bf16
            return torch.autocast(device_type="cpu", dtype=torch.bfloat16)
        return nullcontext()

    def step(self, i: int) -> float:
        """Seconds for one step: forward, backward, clipping (if configured), AdamW.
        ``i >= 1`` so that the momentum-distillation soft targets are on (alpha > 0), as in a run."""
        gen = torch.Generator().manual_seed(1000 + i)
        start = time.perf_counter()
        with self.autocast():
            out = self.task(self.pixels, self.captions, step=i, generator=gen)
            out["loss"].backward()
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        loss = float(out["loss"].detach())
        if loss != loss or abs(loss) == float("inf"):
            raise FloatingPointError(f"{self.preset}/{self.precision}: loss is {loss} at benchmark step {i}")
        return elapsed


def bench_one(preset: str, precision: str, batch_size: int, steps: int, warmup: int, *,
              max_seconds: float = float("inf"), seed: int = 0) -> dict[str, object]:
    """Time ``warmup`` + ``steps`` pre-training steps of ``preset`` in ``precision``.

    The first step is always a warm-up; when its time projects the run past ``max_seconds``
    the other warm-ups and then timed steps are dropped (noted in the record), down to
    reporting the first step alone."""
    bench = Bench(preset, precision, batch_size, seed)
    step, flops, cfg = bench.step, bench.flops, bench.cfg
    begin = time.perf_counter()
    first = step(1)
    extra_warmup, timed = max(warmup - 1, 0), steps
    note = ""
    if first * (extra_warmup + timed) > max_seconds - (time.perf_counter() - begin):
        extra_warmup = 0
        timed = min(steps, int((max_seconds - (time.perf_counter() - begin)) // first))
        note = (f"time budget: 1 warm-up, {timed} of {steps} timed steps" if timed > 0
                else "time budget: first (warm-up) step only")
    for i in range(extra_warmup):
        step(2 + i)
    times = [step(2 + extra_warmup + i) for i in range(timed)] or [first]
    sec = statistics.median(times)
    record = {
        "preset": preset,
        "precision": precision,
        "batch_size": batch_size,
        "image_size": bench.image_size,
        "text_len": bench.text_len,
        "scored_tokens_per_sample": bench.scored,
        "queue_size": cfg.queue_size,
        "grad_checkpointing": cfg.grad_checkpointing,
        "warmup_steps": 1 + extra_warmup,
        "timed_steps": timed,
        "note": note,
        "step_times_s": [round(x, 4) for x in times],
        "s_per_step": sec,
        "samples_per_s": batch_size / sec,
        "gflop_per_sample": flops["total"] / 1e9,
        "gflop_breakdown_per_sample": {k: v / 1e9 for k, v in flops.items()},
        "achieved_gflops": flops["total"] * batch_size / sec / 1e9,
    }
    del bench, step
    gc.collect()
    return record


# -- report ---------------------------------------------------------------------------


def markdown(records: list[dict], peaks: dict[str, float], peak_source: str, info: dict, command: str) -> str:
    lines = [
        "# BLIP pre-training throughput and MFU",
        "",
        f"- Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Machine: {info['cpu']}; {info['usable_cpus']} usable of {info['logical_cpus']} logical CPUs "
        f"(torch CPU capability {info['cpu_capability']}, oneDNN bf16: {info['mkldnn_bf16']}); "
        f"torch {info['torch']} with {info['torch_threads']} threads; Python {info['python']}",
        f"- Matmul peak ({peak_source}): "
        + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in peaks.items()),
        f"- Command: `{command}`",
        "",
        "Full pre-training step (ITC with momentum encoders and queue, ITM with hard negatives, LM; backward; "
        "AdamW), random images at the preset's resolution, 10-word captions padded to 30 tokens. "
        "Median over the timed steps after warm-up. Model FLOPs are counted analytically (formula in "
        "`benchmarks/train_throughput.py`); MFU = achieved model FLOP/s / matmul peak of the same dtype.",
        "",
        "| preset | precision | batch | samples/s | s/step | GFLOP/sample | achieved GFLOP/s | peak GFLOP/s | MFU % "
        "| steps (warm-up + timed) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in records:
        steps = f"{r['warmup_steps']} + {r['timed_steps']}" + (f" ({r['note']})" if r["note"] else "")
        lines.append(
            f"| {r['preset']} | {r['precision']} | {r['batch_size']} | {r['samples_per_s']:.3f} | "
            f"{r['s_per_step']:.3f} | {r['gflop_per_sample']:.3f} | {r['achieved_gflops']:.1f} | "
            f"{r['peak_gflops']:.1f} | {r['mfu_percent']:.1f} | {steps} |"
        )
    parts = [k for k in records[0]["gflop_breakdown_per_sample"] if k != "forward_trained"] if records else []
    lines += ["", "Model GFLOP per sample by part (trained parts x3, momentum forward only):", "",
              "| preset | " + " | ".join(parts) + " |", "|---|" + "---:|" * len(parts)]
    seen = set()
    for r in records:
        if r["preset"] in seen:
            continue
        seen.add(r["preset"])
        b = r["gflop_breakdown_per_sample"]
        lines.append(f"| {r['preset']} | " + " | ".join(f"{b[k]:.4g}" for k in parts) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "base"])
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--runs", nargs="+", default=None, metavar="PRESET:PRECISION",
                        help="explicit runs (e.g. tiny:fp32 tiny:bf16 base:fp32) instead of presets x precisions")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (at least 1 is run)")
    parser.add_argument("--max-minutes", type=float, default=20.0,
                        help="time budget per run: fewer steps when the first one projects past it")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--peak-json", default=None,
                        help="use the peaks of a benchmarks/matmul_peak.py --out file instead of measuring")
    parser.add_argument("--peak-sizes", nargs="+", type=int, default=[1024, 2048, 4096],
                        help="matmul sizes for the peak")
    parser.add_argument("--peak-repeats", type=int, default=10)
    parser.add_argument("--out", default=DEFAULT_OUT, help="Markdown table")
    parser.add_argument("--json", default=None, help="also write the raw records here")
    args = parser.parse_args(argv)
    if args.batch_size < 2:
        parser.error("--batch-size must be at least 2 (ITM draws hard negatives from the rest of the batch)")
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    if args.runs:
        runs = []
        for item in args.runs:
            preset, _, precision = item.partition(":")
            if precision not in ("fp32", "bf16"):
                parser.error(f"--runs expects PRESET:fp32 or PRESET:bf16, got {item!r}")
            runs.append((preset, precision))
    else:
        runs = [(preset, precision) for preset in args.presets for precision in args.precision]
    dtypes = sorted({precision for _, precision in runs}, key=["fp32", "bf16"].index)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = shlex.join(
        ([f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"] if "OMP_NUM_THREADS" in os.environ else [])
        + ["python", *sys.argv]
    )

    if args.peak_json:
        saved = json.loads(Path(args.peak_json).read_text())
        peaks = {p: float(saved["results"][p]["peak_gflops"]) for p in dtypes}
        peak_source = f"from {args.peak_json}"
        threads = saved.get("machine", {}).get("torch_threads")
        if threads is not None and threads != torch.get_num_threads():
            print(f"warning: {args.peak_json} was measured with {threads} threads, this run uses "
                  f"{torch.get_num_threads()}; MFU compares the two", file=sys.stderr)
            peak_source += f", measured with {threads} threads"
    else:
        peaks = {p: measure_peak(p, tuple(args.peak_sizes), repeats=args.peak_repeats) for p in dtypes}
        peak_source = (f"torch.mm, sizes {' '.join(map(str, args.peak_sizes))}, layouts nn/nt/tn, "
                       f"best median of up to {args.peak_repeats}")
    print(json.dumps({"matmul_peak_gflops": peaks}), flush=True)

    info = machine()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    records = []
    for preset, precision in runs:
        r = bench_one(preset, precision, args.batch_size, args.steps, args.warmup,
                      max_seconds=60 * args.max_minutes)
        r["peak_gflops"] = peaks[precision]
        r["mfu_percent"] = 100 * r["achieved_gflops"] / peaks[precision]
        records.append(r)
        print(json.dumps(r), flush=True)
        # Rewritten after every run, so a long run that is stopped keeps the finished rows.
        out.write_text(markdown(records, peaks, peak_source, info, command))
        if args.json:
            Path(args.json).write_text(json.dumps({"machine": info, "peaks": peaks, "command": command,
                                                   "records": records}, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return records


if __name__ == "__main__":
    main()
