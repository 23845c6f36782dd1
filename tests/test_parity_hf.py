"""openblip loads transformers BLIP directories and matches transformers' outputs.

Tiny random models (tests/helpers_hf.py) with widely spread weights; vision and
text widths differ except for VQA, which transformers only supports with equal widths.
"""

from __future__ import annotations

import pytest
import torch
from helpers_hf import random_pixel_values

from openblip.checkpoints import load_model

pytest.importorskip("transformers")

ATOL = 1e-4
TEXTS = ["a dog sitting on the beach with a woman", "two cats"]
IMAGE_SIZE = 32


def _text(processor, texts=TEXTS):
    enc = processor.tokenizer(texts, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def caption(hf_blip):
    directory, hf_model, processor = hf_blip("caption")
    return load_model(directory)[0], hf_model, processor


@pytest.fixture(scope="module")
def retrieval(hf_blip):
    directory, hf_model, processor = hf_blip("retrieval")
    return load_model(directory, grounded_first_token="cls")[0], hf_model, processor


@pytest.fixture(scope="module")
def vqa(hf_blip):
    directory, hf_model, processor = hf_blip("vqa", vision_width=32)
    return load_model(directory, grounded_first_token="cls")[0], hf_model, processor


@pytest.fixture(scope="module")
def pixels():
    return random_pixel_values(2, IMAGE_SIZE, seed=1)


@pytest.mark.parametrize("name", ["caption", "retrieval", "vqa"])
def test_config_follows_config_json(name, request):
    model, hf_model, _ = request.getfixturevalue(name)
    cfg, hf_cfg = model.cfg, hf_model.config
    assert cfg.task == name
    assert (cfg.vision.width, cfg.vision.depth, cfg.vision.heads) == (
        hf_cfg.vision_config.hidden_size, hf_cfg.vision_config.num_hidden_layers,
        hf_cfg.vision_config.num_attention_heads,
    )
    assert (cfg.text.width, cfg.text.heads, cfg.text.vocab_size) == (
        hf_cfg.text_config.hidden_size, hf_cfg.text_config.num_attention_heads, hf_cfg.text_config.vocab_size,
    )
    # transformers' vision LayerNorm eps (1e-5, not BLIP's 1e-6) is read from config.json.
    assert cfg.vision.layer_norm_eps == hf_cfg.vision_config.layer_norm_eps == 1e-5
    assert model.visual_encoder.norm.eps == 1e-5
    assert cfg.extra["source"]["architecture"] == type(hf_model).__name__


@pytest.mark.parametrize("name", ["caption", "retrieval", "vqa"])
@torch.no_grad()
def test_vision_features(name, request, pixels):
    model, hf_model, _ = request.getfixturevalue(name)
    theirs = hf_model.vision_model(pixel_values=pixels).last_hidden_state
    assert _max_diff(model.encode_image(pixels), theirs) < ATOL


@torch.no_grad()
def test_itc_cosine(retrieval, pixels):
    model, hf_model, processor = retrieval
    ids, mask = _text(processor)
    theirs = hf_model(input_ids=ids, pixel_values=pixels, attention_mask=mask, use_itm_head=False).itm_score
    image = model.project_image(model.encode_image(pixels))
    text = model.project_text(model.encode_text(ids, mask))
    assert _max_diff(image @ text.T, theirs) < ATOL


@torch.no_grad()
def test_itm_logits(retrieval, pixels):
    model, hf_model, processor = retrieval
    assert model.cfg.grounded_first_token == "cls"  # transformers' ITM keeps the processor's [CLS]
    ids, mask = _text(processor)
    theirs = hf_model(input_ids=ids, pixel_values=pixels, attention_mask=mask, use_itm_head=True).itm_score
    ours = model.itm_logits(model.encode_grounded(ids, mask, image_embeds=model.encode_image(pixels)))
    assert _max_diff(ours, theirs) < ATOL
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()


@torch.no_grad()
def test_caption_lm_logits(caption, pixels):
    model, hf_model, processor = caption
    ids, mask = _text(processor)
    ids[:, 0] = 30522  # [DEC], as generation and the original training use
    theirs = hf_model(pixel_values=pixels, input_ids=ids, attention_mask=mask).logits
    ours, _ = model.decode(ids, mask, states=model.encode_image(pixels))
    assert _max_diff(ours, theirs) < ATOL


def _vqa_inputs(processor):
    question, question_mask = _text(processor, ["how many dogs are in the picture?", "what is it?"])
    answer, answer_mask = _text(processor, ["one", "a small red ball"])
    answer[:, 0] = 30522  # [DEC]
    return question, question_mask, answer, answer_mask


@torch.no_grad()
def test_vqa_answer_logits(vqa, pixels):
    model, hf_model, processor = vqa
    question, question_mask, answer, answer_mask = _vqa_inputs(processor)
    image = hf_model.vision_model(pixel_values=pixels).last_hidden_state
    image_mask = torch.ones(image.shape[:2], dtype=torch.long)
    q_states = hf_model.text_encoder(
        input_ids=question, attention_mask=question_mask, encoder_hidden_states=image,
        encoder_attention_mask=image_mask,
    ).last_hidden_state
    # The answer decoder attends to every question position, padding included: that is
    # what transformers' (and the original) VQA generate does with its all-ones mask,
    # and transformers 5.24 drops cross-attention masks anyway (see the next test).
    theirs = hf_model.text_decoder(
        input_ids=answer, attention_mask=answer_mask, encoder_hidden_states=q_states,
        encoder_attention_mask=torch.ones_like(question_mask),
    ).logits
    ours_q = model.encode_grounded(question, question_mask, image_embeds=model.encode_image(pixels))
    assert _max_diff(ours_q, q_states) < ATOL
    ours, _ = model.decode(answer, answer_mask, states=ours_q, states_mask=torch.ones_like(question_mask))
    assert _max_diff(ours, theirs) < ATOL


@torch.no_grad()
def test_vqa_question_mask_hides_padding(vqa, pixels):
    """A masked question decodes like the same question without its padding.

    transformers 5.24 does not do this: ``BlipTextLayer`` passes the encoder mask as
    ``attention_mask`` and ``BlipTextSelfAttention`` then replaces it by its (None)
    ``encoder_attention_mask`` argument, so padded question tokens are attended to.
    """
    model, _, processor = vqa
    question, question_mask, answer, answer_mask = _vqa_inputs(processor)
    states = model.encode_grounded(question, question_mask, image_embeds=model.encode_image(pixels))
    masked, _ = model.decode(answer, answer_mask, states=states, states_mask=question_mask)
    short = int(question_mask[1].sum())
    alone, _ = model.decode(answer[1:], answer_mask[1:], states=states[1:, :short])
    assert _max_diff(masked[1:], alone) < ATOL
