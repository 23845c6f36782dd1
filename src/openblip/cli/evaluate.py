"""``openblip evaluate retrieval|caption``: the original evaluation protocols."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import EXIT_OK, CliError, add_model_args, load_blip


def register(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("evaluate", help="evaluate retrieval or captioning")
    ev_sub = ev.add_subparsers(dest="eval_task", metavar="TASK", required=True)

    p = ev_sub.add_parser("retrieval", help="image-text retrieval recall@1/5/10",
                          description="ITC similarities for all pairs, the top-k re-ranked by ITM "
                                      "(score = ITM logit + cosine), recall@1/5/10 in both directions.")
    add_model_args(p, "Salesforce/blip-itm-base-coco")
    _data_args(p)
    p.add_argument("--k-test", type=int, default=256, help="candidates re-ranked by ITM (default: 256)")
    p.add_argument("--first-token", choices=["enc", "cls"], default=None, help="token before text for ITM")
    p.add_argument("--format", choices=["json", "text"], default="json")
    p.set_defaults(run=run_retrieval)

    p = ev_sub.add_parser("caption", help="captioning BLEU-4 and CIDEr",
                          description="Caption every image and score against its reference captions "
                                      "(BLEU-4, CIDEr; METEOR/SPICE only where Java allows).")
    add_model_args(p, "Salesforce/blip-image-captioning-base")
    _data_args(p)
    p.add_argument("--num-beams", type=int, default=3)
    p.add_argument("--max-length", type=int, default=20)
    p.add_argument("--min-length", type=int, default=5)
    p.add_argument("--prompt", default=None)
    p.add_argument("--predictions", type=Path, default=None, help="also write the captions to this JSON file")
    p.add_argument("--java-metrics", action="store_true",
                   help="also METEOR and SPICE (need Java; SPICE needs Java 8 and its CoreNLP jars)")
    p.add_argument("--format", choices=["json", "text"], default="json")
    p.set_defaults(run=run_caption_eval)


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True,
                   help="shards ('test-{00000..00001}.tar'; captions in .txt lines or json['captions']) or an "
                        "annotation JSON list [{'image': path, 'caption': [..]}]")
    p.add_argument("--image-root", default=None, help="folder the JSON list's image paths are relative to")
    p.add_argument("--max-words", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--no-progress", action="store_true")


def load_eval_set(args: argparse.Namespace, transform):
    from ..data.annotations import load_retrieval_json, load_retrieval_shards

    try:
        if args.data.endswith(".json"):
            root = args.image_root or str(Path(args.data).parent)
            evalset = load_retrieval_json(args.data, root, transform, max_words=args.max_words)
        else:
            evalset = load_retrieval_shards(args.data, transform, max_words=args.max_words)
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot read --data {args.data}: {exc}") from exc
    if len(evalset) == 0:
        raise CliError(f"--data {args.data} holds no image with a caption")
    return evalset


def _print(args: argparse.Namespace, result: dict) -> None:
    if args.format == "json":
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            print(f"{key}\t{value:.2f}" if isinstance(value, float) else f"{key}\t{value}")


def run_retrieval(args: argparse.Namespace) -> int:
    from ..evaluate import recall_at_k, retrieval_scores

    blip = load_blip(args)
    evalset = load_eval_set(args, blip.transform)
    first = args.first_token or blip.config.grounded_first_token
    i2t, t2i = retrieval_scores(blip, evalset, evalset.texts, k_test=args.k_test, batch_size=args.batch_size,
                                first_token=first, progress=not args.no_progress)
    result = recall_at_k(i2t, t2i, evalset.img2txt, evalset.txt2img)
    result = {k: round(float(v), 4) for k, v in result.items()}
    result.update(images=len(evalset), texts=len(evalset.texts), k_test=args.k_test)
    if evalset.skipped:
        result["skipped"] = dict(evalset.skipped)
    _print(args, result)
    return EXIT_OK


def run_caption_eval(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from ..evaluate import caption_scores

    blip = load_blip(args)
    evalset = load_eval_set(args, blip.transform)
    prompt_ids, gen = blip.caption_settings(prompt=args.prompt, num_beams=args.num_beams,
                                            max_length=args.max_length, min_length=args.min_length)
    predictions: dict[str, str] = {}
    order = range(len(evalset))
    for start in tqdm(range(0, len(evalset), args.batch_size), disable=args.no_progress, desc="caption"):
        idx = list(order[start : start + args.batch_size])
        pixels = torch.stack([evalset[i][0] for i in idx]).to(blip.device, blip.dtype)
        for i, text in zip(idx, blip.caption_pixels(pixels, prompt_ids, gen)):
            predictions[str(i)] = text
    references = {str(i): [evalset.texts[t] for t in evalset.img2txt[i]] for i in order}
    result = caption_scores(predictions, references, meteor=args.java_metrics, spice=args.java_metrics)
    result.update(images=len(evalset))
    if args.predictions:
        records = [{"image": evalset.keys[i] if evalset.keys else i, "caption": predictions[str(i)]} for i in order]
        args.predictions.write_text(json.dumps(records, indent=1, ensure_ascii=False))
    _print(args, result)
    return EXIT_OK
