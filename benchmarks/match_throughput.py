"""Image-text matching throughput (ITM probability + ITC cosine), openblip vs transformers.

    python benchmarks/match_throughput.py [--texts 8] [--repeats 3] [--out FILE]

One BLIP-base-size ITM model (ViT-B/16 at 384 px, 12-layer BERT-base text encoder with
cross-attention, ITM and ITC heads), random weights, built with transformers'
``BlipForImageTextRetrieval``, saved with ``save_pretrained`` and loaded by ``openblip.load``.
Each side scores every one of 2 photos against the same ``--texts`` captions, ITM probability and
ITC cosine for every pair, from PIL images (preprocessing timed on every side):

* transformers, as its model card shows: ``processor(images=[image] * T, text=texts)`` then
  ``model(**inputs, use_itm_head=True)`` and ``use_itm_head=False``, so the ViT runs on T copies
  of the image, twice;
* transformers, image once: ``vision_model`` once per image, ``text_encoder`` on the T texts with the
  image tokens expanded to T (its cross-attention projects them for every text), and the ITC
  text features from the text encoder alone; the best one can do with transformers' modules;
* openblip: ``blip.match(images, texts, first_token="cls")`` (the image encoded and its
  cross-attention keys/values computed once per image, shared by all texts; ``cls`` puts
  transformers' first token before the text so that both give the same numbers).

Outputs are compared pair by pair (max absolute difference of ITM probability and ITC cosine).
Timing: one warm-up call per side, then ``--repeats`` interleaved rounds, median reported.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from caption_throughput import log, machine_info, save_hf_dir  # noqa: E402

SPREAD = 1.5  # std = SPREAD / sqrt(fan_in) for 2-D weights, so that ITM probabilities are not all ~0.5
PHOTOS = ["astronaut.png", "chelsea.png"]
TEXTS = [
    "a woman in a space suit", "a cat lying on a blanket", "a cup of coffee on a saucer",
    "a rocket on the launch pad at night", "an astronaut holding a helmet next to a flag",
    "a tabby cat looking at the camera with its ears up", "a red motorcycle", "two dogs",
    "a close up photograph of a striped cat", "a white coffee cup", "a man with a camera on a tripod",
    "the night sky full of stars and galaxies",
]


def build_hf_model():
    from transformers import BlipConfig, BlipForImageTextRetrieval

    config = BlipConfig(
        text_config={"vocab_size": 30524, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                     "intermediate_size": 3072},
        vision_config={"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                       "intermediate_size": 3072, "image_size": 384, "patch_size": 16},
    )
    torch.manual_seed(0)
    model = BlipForImageTextRetrieval(config).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, param in model.named_parameters():
            if param.ndim == 2:
                param.copy_(torch.randn(param.shape, generator=gen) * (SPREAD / math.sqrt(param.shape[1])))
    return model


def photos():
    import skimage

    from openblip.images import load_image

    folder = os.path.dirname(skimage.data.__file__)
    return [load_image(os.path.join(folder, name)) for name in PHOTOS]


def hf_model_card(model, processor, images, texts):
    """ITM probabilities and ITC cosines ``(images, texts)``, the way the model card calls the model."""
    itm, itc = [], []
    for image in images:
        inputs = processor(images=[image] * len(texts), text=texts, padding=True, return_tensors="pt")
        itm.append(model(**inputs, use_itm_head=True).itm_score.softmax(-1)[:, 1])
        itc.append(model(**inputs, use_itm_head=False).itm_score.diagonal())
    return torch.stack(itm), torch.stack(itc)


def hf_image_once(model, processor, images, texts):
    """The same scores with the image encoded once and the text features computed once."""
    enc = processor.tokenizer(texts, padding=True, return_tensors="pt")
    text_out = model.text_encoder(input_ids=enc.input_ids, attention_mask=enc.attention_mask)
    text_feat = torch.nn.functional.normalize(model.text_proj(text_out[0][:, 0]), dim=-1)  # (T, E)
    itm, itc = [], []
    for image in images:
        pixels = processor(images=[image], return_tensors="pt").pixel_values
        image_embeds = model.vision_model(pixel_values=pixels)[0]  # (1, N, D)
        expanded = image_embeds.expand(len(texts), -1, -1)
        grounded = model.text_encoder(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                                      encoder_hidden_states=expanded,
                                      encoder_attention_mask=torch.ones(expanded.shape[:2], dtype=torch.long))
        itm.append(model.itm_head(grounded[0][:, 0]).softmax(-1)[:, 1])
        image_feat = torch.nn.functional.normalize(model.vision_proj(image_embeds[:, 0]), dim=-1)
        itc.append((image_feat @ text_feat.t())[0])
    return torch.stack(itm), torch.stack(itc)


def openblip_match(blip, images, texts):
    scores = blip.match(images, texts, first_token="cls")
    return scores.itm, scores.itc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--texts", type=int, default=8, help=f"captions per image (at most {len(TEXTS)})")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/match_throughput.md")
    args = ap.parse_args(argv)
    if not 1 <= args.texts <= len(TEXTS):
        ap.error(f"--texts must be in 1..{len(TEXTS)}")
    import openblip
    from transformers import BlipProcessor

    texts, images = TEXTS[: args.texts], photos()
    hf = build_hf_model()
    with tempfile.TemporaryDirectory() as tmp:
        save_hf_dir(hf, tmp)
        processor = BlipProcessor.from_pretrained(tmp)
        blip = openblip.load(tmp, device="cpu")
        sides = {
            "transformers (model card)": lambda t: hf_model_card(hf, processor, images, t),
            "transformers (image once)": lambda t: hf_image_once(hf, processor, images, t),
            "openblip": lambda t: openblip_match(blip, images, t),
        }
        times = {name: [] for name in sides}
        outs = {}
        with torch.inference_mode():
            for name, fn in sides.items():
                fn(texts[:2])  # warm-up
            names = list(sides)
            for r in range(args.repeats):
                for name in names[r % len(names):] + names[: r % len(names)]:
                    t0 = time.perf_counter()
                    outs[name] = sides[name](texts)
                    times[name].append(time.perf_counter() - t0)
                log(f"round {r + 1}: " + ", ".join(f"{n} {times[n][-1]:.2f} s" for n in names))
    pairs = len(images) * len(texts)
    med = {name: statistics.median(v) for name, v in times.items()}
    ref_itm, ref_itc = outs["transformers (image once)"]
    info = machine_info()
    md = ["# Image-text matching: openblip vs transformers", "",
          f"Command: `python benchmarks/match_throughput.py --texts {args.texts} --repeats {args.repeats}`  ",
          (f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} ({info['torch threads']} threads), "
           f"transformers {info['transformers']}  "),
          (f"Run: {time.strftime('%Y-%m-%d')}; {len(images)} photos x {len(texts)} texts = {pairs} pairs, "
           "ITM probability and ITC cosine for each, from PIL images."), "",
          "| side | seconds (median) | pairs/s | openblip speed-up | max abs diff ITM / ITC vs transformers |",
          "|---|---|---|---|---|"]
    for name in sides:
        itm, itc = outs[name]
        diff = f"{(itm - ref_itm).abs().max():.1e} / {(itc - ref_itc).abs().max():.1e}"
        md.append(f"| {name} | {med[name]:.2f} | {pairs / med[name]:.1f} | {med[name] / med['openblip']:.2f}x "
                  f"| {diff} |")
    md += ["", f"Median of {args.repeats} interleaved rounds after one warm-up call per side; per-round seconds: "
           + "; ".join(f"{n}: " + ", ".join(f"{t:.2f}" for t in v) for n, v in times.items()) + ".",
           (f"ITM probabilities range over [{ref_itm.min():.2f}, {ref_itm.max():.2f}] (random weights, "
            f"std {SPREAD}/sqrt(fan_in)); differences are against the image-once transformers side.")]
    text = "\n".join(md) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
