"""Caption metrics: PTB-style tokenisation, coco-caption BLEU and CIDEr-D on hand examples."""

from __future__ import annotations

import importlib.util
import math
import sys

import pytest

from openblip.evaluate import caption_metrics
from openblip.evaluate.caption_metrics import caption_scores, ptb_tokenize


@pytest.mark.parametrize(
    "text, tokens",
    [
        ("A dog's toy, on the grass.", "a dog 's toy on the grass"),
        ('Two men don\'t play "frisbee" (outside)!', "two men do n't play frisbee -lrb- outside -rrb-"),
        ("the kids' toys; 1,000 cats: at 10:30", "the kids toys 1,000 cats at 10:30"),
        ("a t-shirt -- in the U.S. at 3.5 p.m. ...", "a t-shirt in the u.s. at 3.5 p.m."),
        ("It's a well-known fact that dogs... run", "it 's a well-known fact that dogs run"),
        ("a man!! sitting?? here", "a man !! sitting ?? here"),  # PTB keeps doubled marks
        ("A plate with food on it .", "a plate with food on it"),
        ("50% of the $5 hats", "50 % of the $ 5 hats"),
        ("  extra   spaces\nand a newline ", "extra spaces and a newline"),
    ],
)
def test_ptb_tokenize(text, tokens):
    # Expected strings are the Java PTBTokenizer (-lowerCase) output with coco-caption's
    # punctuation list removed.
    assert ptb_tokenize(text) == tokens


needs_cocoeval = pytest.mark.skipif(
    importlib.util.find_spec("pycocoevalcap") is None, reason="needs the eval extra (pycocoevalcap)"
)


def _scores(preds, refs, **kw):
    return caption_scores(preds, refs, meteor=False, spice=False, **kw)


@needs_cocoeval
def test_identical_captions_give_bleu_one():
    refs = {1: ["a dog runs on the grass"], 2: ["two cats sleep on a red couch"], 3: ["a man rides a bike"]}
    out = _scores({k: v[0] for k, v in refs.items()}, refs)
    assert out["BLEU_4"] == pytest.approx(1.0, abs=1e-6)
    assert out["CIDEr"] == pytest.approx(10.0, abs=1e-6)  # CIDEr-D of a perfect match with one reference
    assert set(out) == {"BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "CIDEr", "notes"}


@needs_cocoeval
def test_bleu_hand_example():
    # 1- to 4-gram precisions 4/5, 3/4, 2/3, 1/2; equal lengths, so no brevity penalty.
    out = _scores({"x": "a b c d e"}, {"x": ["a b c d f"]})
    assert out["BLEU_4"] == pytest.approx((4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25, rel=1e-6)
    assert out["BLEU_1"] == pytest.approx(0.8, rel=1e-6)


@needs_cocoeval
def test_bleu_brevity_penalty_uses_closest_reference():
    # 3 tokens against references of 6 and 4 tokens: the closest (4) sets the penalty.
    out = _scores({"x": "a b c"}, {"x": ["a b c d e f", "a b c x"]})
    assert out["BLEU_3"] == pytest.approx(math.exp(1 - 4 / 3), rel=1e-6)


@needs_cocoeval
def test_cider_hand_example_and_ordering():
    refs = {"a": ["a b c d"], "b": ["e f g h"]}
    assert _scores({"a": "a b c d", "b": "e f g h"}, refs)["CIDEr"] == pytest.approx(10.0)
    # Image b's caption shares nothing with its reference: it scores 0, the mean halves.
    assert _scores({"a": "a b c d", "b": "a b c d"}, refs)["CIDEr"] == pytest.approx(5.0)


@needs_cocoeval
def test_cider_prefers_matching_captions_on_a_varied_set():
    refs = {
        0: ["a dog runs across a grassy field", "a brown dog running on grass"],
        1: ["a man rides a bicycle down the street", "a person riding a bike on a road"],
        2: ["two cats sleeping on a red couch", "cats asleep on a sofa"],
        3: ["a plate of pasta with tomato sauce", "a dish of spaghetti on a table"],
    }
    good = {0: "a brown dog running on the grass", 1: "a man riding a bike on the street",
            2: "two cats sleeping on a couch", 3: "a plate of spaghetti with sauce"}
    shuffled = {0: good[1], 1: good[2], 2: good[3], 3: good[0]}
    matched, mismatched = _scores(good, refs), _scores(shuffled, refs)
    assert matched["CIDEr"] > 1.0 > mismatched["CIDEr"]
    assert matched["BLEU_4"] > mismatched["BLEU_4"]


@needs_cocoeval
def test_single_image_cider_is_zero():
    # idf comes from the references of the evaluated set: with one image every n-gram has idf 0.
    assert _scores({1: "a dog"}, {1: ["a dog"]})["CIDEr"] == 0.0


@needs_cocoeval
def test_punctuation_and_case_do_not_count():
    refs = {1: ["A dog runs on the grass."], 2: ["Two cats, sleeping!"]}
    out = _scores({1: "a dog runs on the grass", 2: "two cats sleeping"}, refs)
    assert out["BLEU_3"] == pytest.approx(1.0, abs=1e-6)


@needs_cocoeval
def test_ids_compared_as_strings_and_missing_ids():
    assert _scores({"1": "a dog"}, {1: ["a dog"]})["BLEU_1"] == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(KeyError, match="no references: 2"):
        _scores({1: "a dog", 2: "a cat"}, {1: ["a dog"]})
    with pytest.raises(KeyError, match="no predictions: 3"):
        _scores({1: "a dog"}, {1: ["a dog"], 3: ["a cat"]})


@needs_cocoeval
def test_without_java_meteor_spice_absent_with_note(monkeypatch):
    monkeypatch.setattr(caption_metrics, "_java_version", lambda: None)
    out = caption_scores({1: "a dog"}, {1: ["a dog"]})
    assert "METEOR" not in out and "SPICE" not in out
    assert any("METEOR/SPICE need Java 8" in note for note in out["notes"])


def test_missing_extra_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocoevalcap.bleu.bleu", None)
    with pytest.raises(ImportError, match=r"openblip\[eval\]"):
        caption_scores({1: "a dog"}, {1: ["a dog"]})
