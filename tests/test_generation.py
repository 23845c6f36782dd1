"""Decoding rules: sampling filters as transformers', argument checks with clear messages."""

import pytest
import torch

from openblip.models.generation import GenerationConfig, _process, _warp


@pytest.mark.parametrize("top_k,top_p,temperature", [(50, 0.9, 1.0), (0, 0.9, 1.0), (10, 1.0, 1.0),
                                                      (50, 0.5, 0.7), (3, 0.99, 1.3)])
def test_sampling_filters_keep_the_same_tokens_as_transformers(top_k, top_p, temperature):
    lp = pytest.importorskip("transformers.generation.logits_process")
    torch.manual_seed(0)
    scores = torch.randn(6, 30524) * 3
    ours = _warp(scores, GenerationConfig(top_k=top_k, top_p=top_p, temperature=temperature, do_sample=True))
    ref = lp.TemperatureLogitsWarper(temperature)(None, scores.clone()) if temperature != 1.0 else scores.clone()
    if top_k:
        ref = lp.TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1.0:
        ref = lp.TopPLogitsWarper(top_p)(None, ref)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    assert torch.allclose(ours.softmax(-1), ref.softmax(-1))


def test_repetition_penalty_and_min_length_as_transformers():
    lp = pytest.importorskip("transformers.generation.logits_process")
    torch.manual_seed(1)
    scores, seqs = torch.randn(3, 40), torch.randint(0, 40, (3, 5))
    cfg = GenerationConfig(repetition_penalty=1.3, min_length=8, eos_token_id=7)
    ref = lp.RepetitionPenaltyLogitsProcessor(1.3)(seqs, scores.clone())
    ref = lp.MinLengthLogitsProcessor(8, 7)(seqs, ref)
    assert torch.equal(_process(scores, seqs, cfg), ref)


@pytest.mark.parametrize("kwargs,message", [
    (dict(max_length=4), "no room"),
    (dict(min_length=30), "min_length"),
    (dict(num_beams=0), "at least 1"),
    (dict(do_sample=True, num_beams=2), "sampling with several beams"),
    (dict(num_beams=2, num_return_sequences=3), "num_beams >="),
    (dict(do_sample=True, top_p=0.0), "top_p"),
    (dict(do_sample=True, temperature=0.0), "temperature"),
])
def test_bad_settings_are_refused_with_a_reason(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GenerationConfig(**{"max_length": 20, **kwargs}).validate(prompt_length=4)
