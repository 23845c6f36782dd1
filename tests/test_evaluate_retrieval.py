"""Retrieval evaluation: recall bookkeeping on hand-built scores, and ITC top-k + ITM re-ranking
against a per-pair reference on a tiny random model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import openblip
from openblip.api import Blip
from openblip.evaluate import recall_at_k, retrieval_scores
from openblip.models.blip import BlipModel
from openblip.tokenizer import BlipTokenizer

# 3 images with 2, 1 and 2 captions: texts 0,1 -> image 0; text 2 -> image 1; texts 3,4 -> image 2.
IMG2TXT = [[0, 1], [2], [3, 4]]
TXT2IMG = [0, 0, 1, 2, 2]


def test_recall_perfect_scores():
    i2t = np.zeros((3, 5))
    for i, texts in enumerate(IMG2TXT):
        i2t[i, texts] = 1.0
    out = recall_at_k(i2t, i2t.T.copy(), IMG2TXT, TXT2IMG)
    assert all(out[k] == 100.0 for k in out)


def test_recall_uses_best_ground_truth_rank():
    i2t = np.array([
        [0.1, 0.9, 0.8, 0.7, 0.6],  # image 0: its text 1 is first -> rank 0
        [0.9, 0.8, 0.1, 0.7, 0.6],  # image 1: its only text 2 is last -> rank 4
        [0.9, 0.8, 0.7, 0.6, 0.5],  # image 2: best of texts 3,4 is text 3 at rank 3
    ])
    t2i = np.array([
        [0.9, 0.1, 0.2],  # text 0 -> image 0, rank 0
        [0.1, 0.9, 0.2],  # text 1 -> image 0, rank 2
        [0.1, 0.9, 0.2],  # text 2 -> image 1, rank 0
        [0.3, 0.2, 0.1],  # text 3 -> image 2, rank 2
        [0.1, 0.2, 0.3],  # text 4 -> image 2, rank 0
    ])
    out = recall_at_k(torch.tensor(i2t), torch.tensor(t2i), IMG2TXT, TXT2IMG)
    assert out["txt_r1"] == pytest.approx(100 / 3)
    assert out["txt_r5"] == out["txt_r10"] == 100.0
    assert out["img_r1"] == pytest.approx(60.0)
    assert out["img_r5"] == 100.0
    assert out["txt_r_mean"] == pytest.approx((100 / 3 + 200) / 3)
    assert out["img_r_mean"] == pytest.approx(260 / 3)
    assert out["r_mean"] == pytest.approx((out["txt_r_mean"] + out["img_r_mean"]) / 2)


def test_recall_at_5_and_10_boundaries():
    # One image, 12 texts, ground truth at rank 5 (0-based): misses R@1 and R@5, hits R@10.
    i2t = -np.arange(12, dtype=float)[None]
    t2i = np.zeros((12, 1))
    out = recall_at_k(i2t, t2i, {0: [5]}, {t: 0 for t in range(12)})
    assert (out["txt_r1"], out["txt_r5"], out["txt_r10"]) == (0.0, 0.0, 100.0)
    assert out["img_r1"] == 100.0


def test_recall_shape_mismatch():
    with pytest.raises(ValueError, match="transposes"):
        recall_at_k(np.zeros((2, 3)), np.zeros((2, 3)), [[0], [1]], [0, 1, 1])


# -- ITC top-k + ITM re-ranking ----------------------------------------------------------------
TEXTS = ["a dog on the grass", "two cats", "a red car parked outside", "people at the beach",
         "a bowl of fruit on a wooden table", "snow"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny matrices: extra intra-op threads only add synchronisation (30x slower on a busy machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def blip():
    torch.manual_seed(0)
    return Blip(BlipModel(openblip.preset("tiny")), BlipTokenizer.default(), device="cpu")


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40 + 8 * i, 48, 3), dtype=np.uint8)) for i in range(4)]


@pytest.fixture(scope="module")
@torch.inference_mode()
def pairwise(blip, images):
    """Cosine and ITM logits with every image-text pair encoded on its own."""
    m, tok = blip.model, blip.tokenizer
    pixels = blip.preprocess(images)
    sims, itm = torch.zeros(len(images), len(TEXTS)), {"enc": torch.zeros(len(images), len(TEXTS))}
    itm["cls"] = torch.zeros_like(sims)
    for i in range(len(images)):
        embeds = m.encode_image(pixels[i : i + 1])
        for t, text in enumerate(TEXTS):
            enc = tok([text], max_length=35, first_token="cls")
            text_feat = m.project_text(m.encode_text(enc["input_ids"], enc["attention_mask"]))
            sims[i, t] = (m.project_image(embeds) @ text_feat.T)[0, 0]
            for first in ("enc", "cls"):
                grounded = tok([text], max_length=35, first_token=first)
                hidden = m.encode_grounded(grounded["input_ids"], grounded["attention_mask"], image_embeds=embeds)
                itm[first][i, t] = m.itm_logits(hidden)[0, 1]
    return sims, itm


def _reference(pairwise, k: int, first_token: str = "enc"):
    """Top-k bookkeeping written out directly from the per-pair scores."""
    sims, itm = pairwise
    full = itm[first_token] + sims
    ni, nt = sims.shape
    i2t, t2i = torch.full((ni, nt), -100.0), torch.full((nt, ni), -100.0)
    for i in range(ni):
        top = sims[i].topk(min(k, nt)).indices
        i2t[i, top] = full[i, top]
    for t in range(nt):
        top = sims[:, t].topk(min(k, ni)).indices
        t2i[t, top] = full[top, t]
    return i2t, t2i


@pytest.mark.parametrize("k", [2, 10])
def test_retrieval_scores_match_per_pair_reference(blip, images, pairwise, k):
    ref_i2t, ref_t2i = _reference(pairwise, k)
    i2t, t2i = retrieval_scores(blip, images, TEXTS, k_test=k, batch_size=3, text_batch_size=4, itm_batch_size=3)
    assert i2t.shape == (4, 6) and t2i.shape == (6, 4)
    torch.testing.assert_close(i2t, ref_i2t, atol=1e-5, rtol=0)
    torch.testing.assert_close(t2i, ref_t2i, atol=1e-5, rtol=0)


def test_topk_bookkeeping(blip, images):
    i2t, t2i = retrieval_scores(blip, images, TEXTS, k_test=2)
    assert ((i2t != -100).sum(1) == 2).all()  # two re-ranked texts per image
    assert ((t2i != -100).sum(1) == 2).all()  # two re-ranked images per text


def test_cls_first_token_and_bare_model(blip, images, pairwise):
    ref_i2t, ref_t2i = _reference(pairwise, 3, first_token="cls")
    pixels = blip.preprocess(images)  # a (N,3,S,S) tensor is accepted as is
    i2t, t2i = retrieval_scores(blip.model, pixels, TEXTS, k_test=3, first_token="cls")
    torch.testing.assert_close(i2t, ref_i2t, atol=1e-5, rtol=0)
    torch.testing.assert_close(t2i, ref_t2i, atol=1e-5, rtol=0)


def test_each_image_encoded_once(blip, images, monkeypatch):
    model = blip.model
    seen = {"images": 0, "calls": 0, "kv": 0}
    encode_image, cross_kv = model.encode_image, model.image_cross_kv

    def spy_encode(pixels):
        seen["images"] += pixels.shape[0]
        seen["calls"] += 1
        return encode_image(pixels)

    def spy_kv(embeds):
        assert embeds.shape[0] == 1
        seen["kv"] += 1
        return cross_kv(embeds)

    monkeypatch.setattr(model, "encode_image", spy_encode)
    monkeypatch.setattr(model, "image_cross_kv", spy_kv)
    retrieval_scores(blip, images, TEXTS, k_test=3, batch_size=2)
    assert seen == {"images": 4, "calls": 2, "kv": 4}
