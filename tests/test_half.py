"""Half-precision inference on CPUs without matrix units for it: which kernel runs, what comes out."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import openblip
from openblip import BlipModel, preset
from openblip.checkpoints import save_model
from openblip.models import half
from openblip.models import linear as lin_mod
from openblip.models.linear import MANY_ROWS, PACK_ROWS, Linear
from openblip.tokenizer import BlipTokenizer


@pytest.fixture(params=[torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def dtype(request):
    return request.param


@pytest.fixture
def emulated(monkeypatch):
    """Behave as on a CPU without native bf16 or fp16, whatever this one has."""
    monkeypatch.delenv("OPENBLIP_HALF_IN_FP32", raising=False)
    monkeypatch.setattr(half, "cpu_has_native", lambda dtype: False)


def test_when_half_products_compute_in_fp32(emulated, monkeypatch, dtype):
    x = torch.zeros(2, 3, dtype=dtype)
    with torch.no_grad():
        assert half.compute_in_fp32(x)
        assert not half.compute_in_fp32(x.float())
        monkeypatch.setenv("OPENBLIP_HALF_IN_FP32", "0")
        assert not half.compute_in_fp32(x)
        monkeypatch.setenv("OPENBLIP_HALF_IN_FP32", "1")
        monkeypatch.setattr(half, "cpu_has_native", lambda dtype: True)
        assert half.compute_in_fp32(x)
        monkeypatch.delenv("OPENBLIP_HALF_IN_FP32")
        assert not half.compute_in_fp32(x)  # native support: PyTorch's own kernels
        monkeypatch.setenv("OPENBLIP_HALF_IN_FP32", "yes")
        with pytest.raises(ValueError, match="OPENBLIP_HALF_IN_FP32='yes'"):
            half.compute_in_fp32(x)
        monkeypatch.delenv("OPENBLIP_HALF_IN_FP32")
    with torch.enable_grad():
        monkeypatch.setattr(half, "cpu_has_native", lambda dtype: False)
        assert not half.compute_in_fp32(x)  # training is left alone


@pytest.mark.parametrize("rows", [1, half.NATIVE_ROWS, half.NATIVE_ROWS + 1, PACK_ROWS, PACK_ROWS + 1, 300, MANY_ROWS])
def test_linear_kernel_by_row_count(emulated, monkeypatch, rows, dtype):
    monkeypatch.setattr(lin_mod, "MIN_ENTRIES", 0)  # small test weights take the paths real ones do
    torch.manual_seed(0)
    layer = Linear(48, 40).to(dtype)
    x = torch.randn(rows, 48).to(dtype)
    with torch.inference_mode():
        out = layer(x)
        native = F.linear(x, layer.weight, layer.bias)
        in_fp32 = F.linear(x.float(), layer.weight.float(), layer.bias.float())
    assert out.dtype == dtype and out.shape == (rows, 40)
    if rows <= half.NATIVE_ROWS:
        assert torch.equal(out, native)
    elif PACK_ROWS < rows < MANY_ROWS or not lin_mod.onednn_enabled():
        assert torch.equal(out, in_fp32.to(dtype))
    else:  # oneDNN's fp32 product, rounded to bf16: within one half-precision step of F.linear's
        torch.testing.assert_close(out.float(), in_fp32, atol=0.0, rtol=2**-7)


def test_attention_and_patch_convolution_in_fp32(emulated, dtype):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 8).to(dtype) for _ in range(3))
    conv = torch.nn.Conv2d(3, 16, 4, 4).to(dtype)
    image = torch.randn(1, 3, 16, 16).to(dtype)
    with torch.inference_mode():
        att = half.attention(q, k, v, is_causal=True)
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
        assert att.dtype == dtype and torch.equal(att, ref.to(dtype))
        out = half.conv2d(image, conv)
        ref = F.conv2d(image.float(), conv.weight.float(), conv.bias.float(), stride=4)
        assert out.dtype == dtype and torch.equal(out, ref.to(dtype))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("bf16-model")
    model = BlipModel(preset("tiny"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # decisive weights, so that captions are not strings of near-ties
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 1.5 / p.shape[1] ** 0.5)
    save_model(model, BlipTokenizer.default(), root)
    return root


@pytest.mark.parametrize("setting", ["1", "0"])
@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_half_model_tracks_fp32(tiny_dir, monkeypatch, setting, name):
    """Both ways of running half precision give features, ITM logits and decoder logits close to fp32's."""
    monkeypatch.setenv("OPENBLIP_HALF_IN_FP32", setting)
    ref, low = openblip.load(tiny_dir), openblip.load(tiny_dir, dtype=name)
    torch.manual_seed(1)
    pixels = torch.randn(5, 3, ref.model.cfg.vision.image_size, ref.model.cfg.vision.image_size)
    ids = torch.tensor([[30522, 2023, 2003, 1037, 4937]] * 5)
    outs = []
    with torch.inference_mode():
        for blip in (ref, low):
            m = blip.model
            img = m.encode_image(pixels.to(blip.dtype))
            kv = m.decoder_cross_kv(img)
            logits, _ = m.decode(ids, cross_kv=kv)
            itm = m.itm_logits(m.encode_grounded(ids, image_embeds=img))
            outs.append((m.project_image(img), itm, logits, kv[0][0].dtype))
    (f32, itm32, lm32, _), (f16, itm16, lm16, kv_dtype) = outs
    assert kv_dtype == (torch.float32 if setting == "1" else low.dtype)
    assert (f32 * f16.float()).sum(-1).min() > 0.99  # cosine of the ITC image features
    torch.testing.assert_close(itm16.float(), itm32, atol=0.1, rtol=0.05)
    assert (lm16.float().argmax(-1) == lm32.argmax(-1)).float().mean() > 0.8
    assert (lm16.float() - lm32).abs().max() < 0.1 * lm32.abs().max()


@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_half_captioning_decodes_every_way(tiny_dir, emulated, name):
    """Greedy, beam and sampled captions in half precision, one image at a time (half-precision
    kernels) and batched (fp32 products), mostly agree with fp32's."""
    ref, blip = openblip.load(tiny_dir), openblip.load(tiny_dir, dtype=name)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40 + 8 * i, 48, 3), dtype=np.uint8)) for i in range(6)]
    for beams in (1, 3):
        want = ref.caption(images, num_beams=beams, max_length=12)
        batched = blip.caption(images, num_beams=beams, max_length=12, batch_size=6)
        single = [blip.caption(im, num_beams=beams, max_length=12) for im in images]
        for got in (batched, single):
            assert all(isinstance(c, str) and c for c in got)
            assert sum(a == b for a, b in zip(got, want)) >= 4, (beams, got, want)
    sampled = blip.caption(images[0], sample=True, num_captions=3, seed=1, max_length=12)
    assert sampled == blip.caption(images[0], sample=True, num_captions=3, seed=1, max_length=12)
    assert len(sampled) == 3 and all(sampled)
