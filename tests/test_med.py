"""Cross-attention of the MED text transformer: image keys/values against the folded form."""

import pytest
import torch

from openblip.config import TextConfig
from openblip.models import med
from openblip.models.med import FoldedKV, TextDecoder, TextTransformer, cross_batch

CFG = TextConfig(vocab_size=50, width=32, depth=2, heads=4, intermediate_size=64, max_position_embeddings=32)


def _randomised(module: torch.nn.Module) -> torch.nn.Module:
    """Every parameter drawn anew: the BERT init's zero biases would hide a mishandled key or value bias."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.3)
    return module.eval()


def _model(cross_width: int = 48) -> TextTransformer:
    return _randomised(TextTransformer(CFG, cross_width))


@pytest.mark.parametrize("per_image,length", [(1, 1), (3, 1), (1, 5), (2, 4)])
@pytest.mark.parametrize("masked", [False, True])
def test_folded_cross_attention_equals_keys_and_values(per_image, length, masked):
    model = _model()
    states = torch.randn(2, 7, 48)  # 2 images of 7 tokens, width 48 (not the text width)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3]) if masked else None
    ids = torch.randint(1, 50, (2 * per_image, length))
    with torch.no_grad():
        kv = model.cross_kv(states)
        folded = [FoldedKV(states)] * CFG.depth
        ref, _ = model(ids, cross_kv=kv, encoder_attention_mask=mask)
        out, _ = model(ids, cross_kv=folded, encoder_attention_mask=mask)
        if masked:  # padding tokens must not count: changing them changes nothing
            states[1, 4:] = 100.0
            again, _ = model(ids, cross_kv=[FoldedKV(states)] * CFG.depth, encoder_attention_mask=mask)
            torch.testing.assert_close(again, out, atol=1e-5, rtol=1e-5)
    assert out.abs().max() > 0.1
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_folded_decoding_with_a_cache_equals_keys_and_values():
    decoder = _randomised(TextDecoder(CFG, 48))
    states = torch.randn(3, 6, 48)
    ids = torch.randint(1, 50, (3, 4))
    with torch.no_grad():
        outs = []
        for kv in (decoder.bert.cross_kv(states), decoder.bert.cross_kv(states, rows_per_item=1)):
            past, steps = None, []
            for t in range(ids.shape[1]):
                logits, past = decoder(ids[:, t : t + 1], cross_kv=kv, past=past, use_cache=True)
                steps.append(logits)
            outs.append(torch.cat(steps, dim=1))
    assert isinstance(kv[0], FoldedKV)
    torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=1e-4)


def test_cross_kv_folds_only_for_one_row_per_item_in_fp32_cpu_inference():
    model = _model()
    states = torch.randn(2, 7, 48)
    with torch.no_grad():
        assert all(isinstance(kv, FoldedKV) for kv in model.cross_kv(states, rows_per_item=1))
        for rows in (None, 2, 3):
            kvs = model.cross_kv(states, rows_per_item=rows)
            assert isinstance(kvs[0], tuple) and kvs[0][0].shape == (2, 4, 7, 8)
    assert isinstance(model.cross_kv(states, rows_per_item=1)[0], tuple)  # gradients on: training
    assert cross_batch(model.cross_kv(states)[0]) == cross_batch(FoldedKV(states)) == 2


@pytest.mark.parametrize("in_fp32", ["0", "1"])
def test_half_precision_folds_where_it_computes_in_fp32(monkeypatch, in_fp32):
    monkeypatch.setenv("OPENBLIP_HALF_IN_FP32", in_fp32)
    model = _model().bfloat16()
    states = torch.randn(2, 7, 48).bfloat16()
    ids = torch.randint(1, 50, (2, 3))
    with torch.no_grad():
        kv = model.cross_kv(states, rows_per_item=1)
        assert isinstance(kv[0], FoldedKV) == (in_fp32 == "1")
        if in_fp32 == "1":
            assert kv[0].states.dtype == torch.float32  # converted once, not at every step
            out, _ = model(ids, cross_kv=kv)
            ref, _ = model(ids, cross_kv=model.cross_kv(states))
            assert out.dtype == torch.bfloat16
            torch.testing.assert_close(out.float(), ref.float(), atol=0.1, rtol=0.05)


def test_fold_rows_zero_turns_folding_off(monkeypatch):
    monkeypatch.setattr(med, "FOLD_ROWS", 0)
    with torch.no_grad():
        assert isinstance(_model().cross_kv(torch.randn(1, 3, 48), rows_per_item=1)[0], tuple)


def test_a_query_batch_not_a_multiple_of_the_images_is_refused():
    model = _model()
    with torch.no_grad(), pytest.raises(ValueError, match="not a multiple"):
        model(torch.randint(1, 50, (3, 2)), cross_kv=[FoldedKV(torch.randn(2, 7, 48))] * CFG.depth)
