"""Table 1 in miniature: held-out retrieval and caption metrics of two models, side by side.

`openblip bootstrap`'s ``evaluate`` stage scores the model pre-trained on the noisy web data and the
one pre-trained on the bootstrapped data (each through its captioner and filter) on the same
held-out shards, and `compare` lays the metrics out as noisy vs bootstrapped. Settings problems
raise `EvaluateError`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..data.shards import IMAGE_EXTENSIONS, expand_urls, iter_samples
from ..data.stream import split_captions
from ..train import distributed as dist
from .manifest import write_json


class EvaluateError(ValueError):
    """The evaluation settings or held-out data cannot be used."""


EVAL_DEFAULTS: dict[str, Any] = {"data": None, "limit": 1000, "finetune": True, "k_test": 128, "label_key": None,
                                 "batch_size": 64, "num_beams": 3, "max_length": 20, "min_length": 5}
COMPARED = (("retrieval", "txt_r1"), ("retrieval", "img_r1"), ("retrieval", "r_mean"),
            ("retrieval", "class_txt_r1"), ("retrieval", "class_img_r1"), ("caption", "BLEU_4"),
            ("caption", "CIDEr"))


def check_eval_settings(settings: dict[str, Any]) -> None:
    unknown = set(settings) - set(EVAL_DEFAULTS)
    if unknown:
        raise EvaluateError(f"evaluate: unknown settings {sorted(unknown)}; known: {sorted(EVAL_DEFAULTS)}")
    if not settings.get("data"):
        raise EvaluateError("evaluate.data is not set: held-out shards (e.g. --set evaluate.data=DIR/test-00000.tar)")
    try:
        import pycocoevalcap.cider.cider  # noqa: F401  (caption metrics; better to fail before training)
    except ImportError as exc:
        raise EvaluateError("evaluate needs pycocoevalcap: pip install 'openblip[eval]'") from exc


def _eval_set(settings: dict[str, Any]):
    """The first `limit` held-out samples with an image and a caption, and their labels."""
    from ..data.annotations import RetrievalEvalSet

    evalset = RetrievalEvalSet([], [], [], [], transform=None)
    labels: list[Any] = []
    for path in (p for group in expand_urls(settings["data"]) for p in group):
        for sample in iter_samples(path, lazy=IMAGE_EXTENSIONS):
            if len(evalset) >= settings["limit"]:
                return evalset, labels
            image = next((sample[e] for e in IMAGE_EXTENSIONS if e in sample), None)
            captions = split_captions(sample, 30)
            if image is None or not captions:
                continue
            evalset.add(sample["__key__"], image, captions)
            meta = sample.get("json") if isinstance(sample.get("json"), dict) else {}
            labels.append(meta.get(settings["label_key"]) if settings["label_key"] else None)
    return evalset, labels


def evaluate_models(models: dict[str, tuple[str, str]], settings: dict[str, Any], folder: Path,
                    info: dist.DistInfo, progress: bool) -> dict[str, Any]:
    """Retrieval (every rank) and caption metrics (rank 0) of each ``name: (captioner, filter)``;
    rank 0 writes each model's captions to ``folder/<name>-captions.json``."""
    settings = {**EVAL_DEFAULTS, **settings}
    evalset, labels = _eval_set(settings)
    if len(evalset) == 0:
        raise EvaluateError(f"evaluate.data {settings['data']} holds no image with a caption")
    results: dict[str, Any] = {"images": len(evalset), "texts": len(evalset.texts)}
    for name, (captioner, filter_model) in models.items():
        entry = {"captioner": captioner, "filter": filter_model,
                 "retrieval": _retrieval_metrics(filter_model, evalset, labels, settings, info, progress)}
        if info.is_main:
            entry["caption"] = _caption_metrics(captioner, evalset, settings, folder / f"{name}-captions.json", info)
        results[name] = entry
        dist.barrier()
    return results


def _retrieval_metrics(source: str, evalset, labels: list[Any], settings: dict[str, Any], info: dist.DistInfo,
                       progress: bool) -> dict[str, float]:
    from ..api import Blip
    from ..evaluate import recall_at_k, retrieval_scores

    blip = Blip.from_pretrained(source, device=str(info.device), task="retrieval")
    evalset.transform = blip.transform
    i2t, t2i = retrieval_scores(blip, evalset, evalset.texts, k_test=settings["k_test"],
                                batch_size=settings["batch_size"], first_token=blip.config.grounded_first_token,
                                progress=progress and info.is_main)
    metrics = recall_at_k(i2t, t2i, evalset.img2txt, evalset.txt2img)
    if settings["label_key"]:
        # Class-level hits: with templated captions, many texts describe the same class equally well.
        text_labels = [labels[i] for i in evalset.txt2img]
        best_text, best_image = i2t.argmax(1).tolist(), t2i.argmax(1).tolist()
        hits_txt = sum(text_labels[t] == labels[i] for i, t in enumerate(best_text))
        hits_img = sum(labels[i] == text_labels[t] for t, i in enumerate(best_image))
        metrics["class_txt_r1"] = 100.0 * hits_txt / len(labels)
        metrics["class_img_r1"] = 100.0 * hits_img / len(text_labels)
    return {k: round(float(v), 4) for k, v in metrics.items()}


def _caption_metrics(source: str, evalset, settings: dict[str, Any], predictions_path: Path,
                     info: dist.DistInfo) -> dict[str, float]:
    from ..api import Blip
    from ..evaluate import caption_scores

    blip = Blip.from_pretrained(source, device=str(info.device))
    evalset.transform = blip.transform
    prompt_ids, gen = blip.caption_settings(num_beams=settings["num_beams"], max_length=settings["max_length"],
                                            min_length=settings["min_length"])
    predictions: dict[str, str] = {}
    for start in range(0, len(evalset), settings["batch_size"]):
        idx = range(start, min(len(evalset), start + settings["batch_size"]))
        pixels = torch.stack([evalset[i][0] for i in idx]).to(blip.device, blip.dtype)
        with torch.inference_mode():
            predictions.update(zip(map(str, idx), blip.caption_pixels(pixels, prompt_ids, gen)))
    references = {str(i): [evalset.texts[t] for t in evalset.img2txt[i]] for i in range(len(evalset))}
    write_json(predictions_path, [{"key": evalset.keys[i], "caption": predictions[str(i)],
                                   "references": references[str(i)]} for i in range(len(evalset))])
    scores = caption_scores(predictions, references, meteor=False, spice=False)
    return {k: round(float(v), 4) for k, v in scores.items() if k != "notes"}


def compare(results: dict[str, Any]) -> dict[str, Any]:
    """Noisy vs bootstrapped per metric, with the difference and a Markdown table (Table 1 in miniature)."""
    rows: dict[str, Any] = {}
    for group, metric in COMPARED:
        noisy = results.get("noisy", {}).get(group, {}).get(metric)
        boot = results.get("bootstrapped", {}).get(group, {}).get(metric)
        if noisy is not None and boot is not None:
            rows[metric] = {"noisy": noisy, "bootstrapped": boot, "delta": round(boot - noisy, 4)}
    header = "| pre-training data | " + " | ".join(rows) + " |"
    lines = [header, "|---" * (len(rows) + 1) + "|"]
    for name in ("noisy", "bootstrapped"):
        lines.append(f"| {name} | " + " | ".join(f"{row[name]:.2f}" for row in rows.values()) + " |")
    return {"metrics": rows, "markdown": "\n".join(lines)}
