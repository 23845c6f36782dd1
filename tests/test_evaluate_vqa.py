"""VQA accuracy: official normalisation and leave-one-out scoring on hand examples; exact match."""

from __future__ import annotations

import pytest

from openblip.evaluate.vqa_accuracy import (
    exact_match_accuracy,
    normalize_answer,
    process_digit_article,
    process_punctuation,
    vqa_accuracy,
    vqa_score,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("t-shirt", "t shirt"),  # no space next to the mark: replaced by a space
        ("a - b", "a  b"),  # a space next to it: deleted
        ("1,000 (about)", "1000 about"),  # a digit comma anywhere: every mark deleted
        ("yes.", "yes"),
        ("3.5", "3.5"),  # periods before a digit stay
        ("what?!", "what  "),  # replaced by spaces; the word split later absorbs them
    ],
)
def test_process_punctuation(text, expected):
    assert process_punctuation(text) == expected


def test_process_digit_article():
    assert process_digit_article("The Two dogs") == "2 dogs"
    assert process_digit_article("none") == "0"
    assert process_digit_article("dont know") == "don't know"
    assert process_digit_article("an apple a day") == "apple day"


def test_normalize_answer():
    assert normalize_answer("  Two.\n") == "2"
    assert normalize_answer("The t-shirt!") == "t shirt"


@pytest.mark.parametrize(
    "prediction, answers, expected",
    [
        ("yes", ["yes"] * 10, 1.0),
        ("Yes", ["yes"] * 10, 1.0),  # the prediction is normalised
        ("2", ["2"] * 2 + ["3"] * 8, 0.6),  # (2 * 1/3 + 8 * 2/3) / 10
        ("red", ["red"] * 3 + ["blue"] * 7, 0.9),  # (3 * 2/3 + 7 * 1) / 10
        ("red", ["red"] * 4 + ["blue"] * 6, 1.0),
        ("green", ["red"] * 4 + ["blue"] * 6, 0.0),
        ("two", ["2"] * 3 + ["3"] * 7, 0.9),  # number words become digits
        ("a dog", ["dog"] * 10, 1.0),  # articles dropped
        ("dont know", ["don't know"] * 10, 1.0),  # contractions restored
        ("t-shirt", ["t-shirt"] * 4 + ["shirt"] * 6, 1.0),  # disagreeing answers are normalised too
        # Official quirk: unanimous answers are compared as given, the prediction normalised.
        ("t-shirt", ["t-shirt"] * 10, 0.0),
    ],
)
def test_vqa_score(prediction, answers, expected):
    assert vqa_score(prediction, answers) == pytest.approx(expected)


def test_vqa_score_needs_several_answers():
    with pytest.raises(ValueError, match="exact_match_accuracy"):
        vqa_score("yes", ["yes"])


def test_vqa_accuracy_overall_and_types():
    answers = {1: ["yes"] * 10, 2: ["2"] * 2 + ["3"] * 8, "3": ["red"] * 10}
    preds = {"1": "yes", 2: "2", 3: "blue"}  # ids compared as strings
    out = vqa_accuracy(preds, answers, answer_types={1: "yes/no", 2: "number", 3: "other"})
    assert out["overall"] == pytest.approx(100 * (1.0 + 0.6 + 0.0) / 3)
    assert out["num_questions"] == 3
    assert out["per_answer_type"] == pytest.approx({"number": 60.0, "other": 0.0, "yes/no": 100.0})
    assert "per_question_type" not in out


def test_vqa_accuracy_missing_ids():
    with pytest.raises(KeyError, match="have no prediction: 2"):
        vqa_accuracy({1: "yes"}, {1: ["yes"] * 10, 2: ["no"] * 10})


def test_exact_match_accuracy():
    preds = {1: "Two.", 2: "the red one", 3: "circle", 4: "blue"}
    answers = {1: "2", 2: "red one", 3: ["circle", "round"], 4: "green"}
    out = exact_match_accuracy(preds, answers)
    assert out == {"accuracy": 75.0, "num_questions": 4}
    with pytest.raises(KeyError):
        exact_match_accuracy({1: "a"}, {2: "a"})
