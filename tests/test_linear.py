"""The CPU inference products of openblip.models.linear against F.linear."""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

from openblip.models import linear as lin_mod
from openblip.models.linear import MANY_ROWS, PACK_ROWS, Linear, linear


@pytest.fixture(autouse=True)
def small_weights_count(monkeypatch):
    """The tests' small weights take the paths that real (>= 2^18 entries) ones do, packed at first use."""
    monkeypatch.setattr(lin_mod, "MIN_ENTRIES", 0)
    monkeypatch.setattr(lin_mod, "PACK_AFTER", 1)


SHAPES = [(1, 1, 24), (3, 1, 24), (2, 2, 24), (5, 24), (0, 24), (2, PACK_ROWS, 24), (PACK_ROWS + 1, 24),
          (2, MANY_ROWS // 2, 24), (3, MANY_ROWS // 2 + 1, 24)]


@pytest.fixture(params=["onednn", "fallback"])
def path(request, monkeypatch):
    if request.param == "onednn":
        if not lin_mod.onednn_enabled():
            pytest.skip("this PyTorch has no oneDNN linear")
    else:
        monkeypatch.setattr(lin_mod, "_OP", None)
    return request.param


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("with_owner", [True, False])
def test_inference_linear_matches_f_linear(path, shape, with_bias, with_owner):
    torch.manual_seed(0)
    layer = Linear(24, 40, bias=with_bias)
    x = torch.randn(shape)
    with torch.no_grad():
        out = linear(x, layer.weight, layer.bias, layer if with_owner else None)
        ref = F.linear(x, layer.weight, layer.bias)
    assert out.shape == (*shape[:-1], 40) and out.is_contiguous()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_non_contiguous_input(path):
    torch.manual_seed(0)
    layer = Linear(24, 40)
    x = torch.randn(3, 24, 2).transpose(1, 2)  # (3, 2, 24), not contiguous
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)


def test_packed_weight_is_cached_rebuilt_on_change_and_never_saved(path):
    torch.manual_seed(0)
    layer = Linear(24, 40)
    x = torch.randn(2, 24)
    with torch.no_grad():
        layer(x)
        first = lin_mod._PACKED.get(layer)
        layer(x)
        assert lin_mod._PACKED.get(layer) is first  # reused, not re-packed per call
        layer.weight.mul_(2.0)  # an in-place update (load_state_dict, an optimizer step) ...
        out = layer(x)
    torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)
    if path == "onednn":
        assert first is not None and lin_mod._PACKED[layer] is not first  # ... re-packs
    assert set(layer.state_dict()) == {"weight", "bias"}
    copy.deepcopy(layer)  # the opaque packed tensor is not part of the module
    pickle.dumps(layer)


@pytest.mark.parametrize("why", ["switched off by OPENBLIP_ONEDNN=0", "weight below MIN_ENTRIES"])
def test_nothing_is_packed(monkeypatch, why):
    if why.startswith("switched"):
        monkeypatch.setenv("OPENBLIP_ONEDNN", "0")
        assert not lin_mod.onednn_enabled()
    else:
        monkeypatch.setattr(lin_mod, "MIN_ENTRIES", 24 * 40 + 1)
    layer = Linear(24, 40)
    with torch.no_grad():
        layer(torch.randn(8 if why.startswith("switched") else 3, 24))
    assert layer not in lin_mod._PACKED


def test_with_gradients_it_is_f_linear():
    torch.manual_seed(0)
    layer = Linear(24, 40)
    x = torch.randn(3, 24, requires_grad=True)
    out = layer(x)
    torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias), atol=0, rtol=0)
    out.sum().backward()
    assert layer.weight.grad is not None and x.grad is not None
    assert layer not in lin_mod._PACKED


@pytest.fixture
def threads():
    """Set torch's thread count for one test, restored after."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("n_threads,out_features,blocks", [(2, 40, 2), (3, 40, 2), (4, 40, 4), (2, 7, 1), (1, 40, 1)])
def test_one_row_is_split_into_a_block_per_thread(monkeypatch, threads, n_threads, out_features, blocks):
    threads(n_threads)
    calls = []
    split = lin_mod._split_one_row
    monkeypatch.setattr(lin_mod, "_split_one_row", lambda *a: calls.append(a[-1]) or split(*a))
    torch.manual_seed(0)
    layer = Linear(24, out_features)
    for x in (torch.randn(24), torch.randn(1, 1, 24)):
        with torch.inference_mode():
            out = layer(x)
        assert out.shape == (*x.shape[:-1], out_features)
        torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)
    assert calls == ([blocks] * 2 if blocks > 1 else [])
    assert layer not in lin_mod._PACKED


def test_one_row_through_a_non_contiguous_weight_is_not_split(monkeypatch, threads):
    threads(2)
    monkeypatch.setattr(lin_mod, "_split_one_row", None)  # would fail if called
    torch.manual_seed(0)
    weight = torch.randn(24, 40).t()  # (40, 24), transposed view
    x = torch.randn(1, 24)
    with torch.no_grad():
        torch.testing.assert_close(linear(x, weight), F.linear(x, weight), atol=1e-5, rtol=1e-5)


def test_one_row_on_one_thread_uses_onednn_only_for_large_weights(monkeypatch, threads):
    if not lin_mod.onednn_enabled():
        pytest.skip("this PyTorch has no oneDNN linear")
    threads(1)
    torch.manual_seed(0)
    small, large = Linear(24, 40), Linear(24, 400)
    monkeypatch.setattr(lin_mod, "GEMV_MAX_ENTRIES", 24 * 400)
    x = torch.randn(1, 24)
    with torch.no_grad():
        for layer in (small, large):
            torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)
    assert small not in lin_mod._PACKED and large in lin_mod._PACKED


@pytest.mark.parametrize("rows,packs", [(2, True), (PACK_ROWS, True), (PACK_ROWS + 1, False),
                                       (MANY_ROWS - 1, False), (MANY_ROWS, True), (3 * MANY_ROWS, True)])
def test_row_counts_that_use_the_packed_weight(rows, packs):
    if not lin_mod.onednn_enabled():
        pytest.skip("this PyTorch has no oneDNN linear")
    torch.manual_seed(0)
    layer = Linear(24, 40)
    x = torch.randn(rows, 24)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)
    assert (layer in lin_mod._PACKED) == packs


def test_few_rows_pack_a_weight_at_its_pack_after_th_use(monkeypatch):
    if not lin_mod.onednn_enabled():
        pytest.skip("this PyTorch has no oneDNN linear")
    monkeypatch.setattr(lin_mod, "PACK_AFTER", 3)
    torch.manual_seed(0)
    layer, batch_layer = Linear(24, 40), Linear(24, 40)
    x = torch.randn(3, 24)
    with torch.no_grad():
        for use in range(1, 4):
            torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)
            assert (layer in lin_mod._PACKED) == (use == 3)
        layer.weight.mul_(2.0)  # a changed weight counts its uses afresh
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)
        assert lin_mod._USES[layer][1] == 1 and layer not in lin_mod._PACKED
        batch_layer(torch.randn(MANY_ROWS, 24))  # a multi-image product packs at once
    assert batch_layer in lin_mod._PACKED


def test_cross_attention_keys_values_are_contiguous_for_inference():
    import openblip

    torch.manual_seed(0)
    model = openblip.BlipModel(openblip.preset("tiny")).eval()
    states = torch.randn(2, 17, model.cfg.vision.width)
    with torch.no_grad():
        k, v = model.decoder_cross_kv(states)[0]
    assert k.shape == (2, model.cfg.text.heads, 17, model.cfg.text.width // model.cfg.text.heads)
    assert k.is_contiguous() and v.is_contiguous()
    k_grad, v_grad = model.decoder_cross_kv(states)[0]  # training keeps the view (no copy in the graph)
    assert not k_grad.is_contiguous()
    torch.testing.assert_close(k, k_grad.detach())
    torch.testing.assert_close(v, v_grad.detach())
