"""Decoding matches transformers' generate token for token on the same weights.

The [SEP] bias of the LM head is raised so that captions end at different
lengths, which exercises how finished beams and sequences are handled.
"""

from __future__ import annotations

import pytest
import torch
from helpers_hf import random_pixel_values

import openblip
from openblip.models.generation import GenerationConfig, generate
from openblip.models.med import FoldedKV

pytest.importorskip("transformers")

SEP, DEC = 102, 30522
IMAGE_SIZE = 32
PROMPTS = {"none": [DEC], "a picture of": [DEC, 1037, 3861, 1997]}
SETTINGS = [
    dict(),
    dict(num_beams=3),
    dict(num_beams=3, min_length=8),
    dict(num_beams=3, repetition_penalty=1.5, length_penalty=0.6),
    dict(num_beams=2, min_length=5, max_length=12),
    dict(repetition_penalty=1.3, min_length=6),
    dict(num_beams=4, num_return_sequences=2, max_length=12),
]


def _sep_bias(hf_model, value):
    with torch.no_grad():
        hf_model.text_decoder.cls.predictions.bias[SEP] += value


@pytest.fixture(scope="module")
def caption_pair(hf_blip, tmp_path_factory):
    directory, hf_model, _ = hf_blip("caption")
    hf_model = type(hf_model).from_pretrained(directory).eval()  # a private copy we may modify
    _sep_bias(hf_model, 4.0)
    out = tmp_path_factory.mktemp("caption-sep")
    hf_model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json",
                 "preprocessor_config.json", "processor_config.json"):
        if (directory / name).exists():
            (out / name).write_bytes((directory / name).read_bytes())
    return openblip.load(out), hf_model


def _hf_sequences(ids: torch.Tensor) -> list[list[int]]:
    rows = []
    for row in ids.tolist():
        row = row[: row.index(SEP) + 1] if SEP in row else row
        rows.append([t for t in row if t != 0])
    return rows


@pytest.mark.parametrize("prompt", PROMPTS, ids=list(PROMPTS))
@pytest.mark.parametrize("setting", SETTINGS, ids=[str(s) or "greedy" for s in SETTINGS])
def test_caption_tokens_match_transformers(caption_pair, prompt, setting):
    blip, hf_model = caption_pair
    pixels = random_pixel_values(5, IMAGE_SIZE, seed=3)
    kw = {"max_length": 20, **setting}
    prompt_ids = PROMPTS[prompt]
    with torch.no_grad():
        hf_ids = hf_model.generate(pixel_values=pixels, input_ids=torch.tensor([prompt_ids + [SEP]] * 5), **kw)
        model, cfg = blip.model, GenerationConfig(**kw)
        cross_kv = model.decoder_cross_kv(model.encode_image(pixels), cfg.rows_per_input)
        ours = generate(model.text_decoder, cross_kv, torch.tensor([prompt_ids] * 5), cfg)
    assert isinstance(cross_kv[0], FoldedKV) == (cfg.rows_per_input == 1)  # greedy never computes image keys
    assert ours == _hf_sequences(hf_ids)
    lengths = {len(s) for s in ours}
    if setting.get("num_beams", 1) == 1 and "min_length" not in setting:
        assert len(lengths) > 1, "the [SEP] bias should make captions of several lengths"


def test_caption_text_and_prompt_stripping_match_transformers(caption_pair, hf_blip):
    blip, hf_model = caption_pair
    _, _, processor = hf_blip("caption")
    pixels = random_pixel_values(4, IMAGE_SIZE, seed=5)
    prompt_ids, gen = blip.caption_settings(prompt="a picture of ", num_beams=3, max_length=20, min_length=5)
    ours = blip.caption_pixels(pixels, prompt_ids, gen)
    with torch.no_grad():
        hf_ids = hf_model.generate(pixel_values=pixels, input_ids=torch.tensor([prompt_ids + [SEP]] * 4),
                                   num_beams=3, max_length=20, min_length=5)
    texts = processor.batch_decode(hf_ids[:, len(prompt_ids):], skip_special_tokens=True,
                                   clean_up_tokenization_spaces=True)
    assert ours == [t.strip() for t in texts]


def test_vqa_answers_match_transformers(hf_blip):
    directory, hf_model, processor = hf_blip("vqa", vision_width=32)
    blip = openblip.load(directory, grounded_first_token="cls")
    pixels = random_pixel_values(3, IMAGE_SIZE, seed=7)
    questions = ["what is on the table", "how many dogs are there", "is it raining outside today"]
    for i, question in enumerate(questions):  # one question at a time: transformers ignores question padding
        enc = processor.tokenizer([question], return_tensors="pt")
        with torch.no_grad():
            hf_ids = hf_model.generate(pixel_values=pixels[i : i + 1], input_ids=enc["input_ids"],
                                       num_beams=3, max_length=10, min_length=1)
            model = blip.model
            q = blip.tokenizer([question], first_token="cls")
            states = model.encode_grounded(q["input_ids"], q["attention_mask"],
                                           image_embeds=model.encode_image(pixels[i : i + 1]))
            ours = generate(model.text_decoder, model.decoder_cross_kv(states), torch.tensor([[DEC]]),
                            GenerationConfig(num_beams=3, max_length=10, min_length=1),
                            cross_mask=q["attention_mask"])
        assert ours == _hf_sequences(hf_ids)
