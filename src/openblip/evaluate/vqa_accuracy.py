"""VQA accuracy as the official VQA evaluation (vqaEval.py, also vendored by LAVIS), and exact match.

Official accuracy of one question with human answers ``a_1..a_n`` (n = 10 in VQA v2):
``mean_j min(1, #{i != j : a_i == prediction} / 3)``, i.e. ``min(1, #humans / 3)`` averaged over
the n leave-one-out subsets, after this normalisation (reproduced from vqaEval.py):

* the prediction: newlines/tabs to spaces, strip; punctuation (`process_punctuation`); then
  number words to digits, articles dropped, missing apostrophes restored
  (`process_digit_article`, which also lower-cases);
* the human answers: only `process_punctuation`, and only when they do not all agree (the
  official code relies on the annotations being normalised already).

Covered: the official punctuation list and its "remove vs replace by space" rule, the period
and digit-comma rules, number words zero..ten and "none" -> "0", articles, the official
contraction table. Not covered: per-question-type breakdowns beyond what the caller passes in,
and the official rounding to two decimals (results here are unrounded percentages).

`exact_match_accuracy` is for datasets with one answer per question (e.g. easy-vqa): both
sides fully normalised, then compared.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

# The official table: misspelt contractions -> the apostrophe form (keys are matched after lower-casing,
# so the few capitalised keys never fire, as in the original).
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow'sat",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset(["a", "an", "the"])
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
# The official pattern; its "(?!<=\d)" is a look-ahead, not a look-behind, so in effect it strips
# every period not followed by a digit ("3.5" keeps its period, "st." loses it).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def process_punctuation(text: str) -> str:
    """Official rule: a mark next to a space (or any text with a digit comma like "1,000") is
    deleted, otherwise replaced by a space ("t-shirt" -> "t shirt"); then periods are stripped."""
    out = text
    delete = _COMMA_STRIP.search(text) is not None
    for p in PUNCTUATION:
        if delete or p + " " in text or " " + p in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=32)  # the official code passes re.UNICODE (= 32) as the count


def process_digit_article(text: str) -> str:
    """Lower-case; number words to digits; drop articles; restore contractions ("dont" -> "don't")."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(text: str) -> str:
    """Full official normalisation of a predicted answer: "Two dogs." -> "2 dogs"."""
    return process_digit_article(process_punctuation(_clean(text)))


def vqa_score(prediction: str, answers: Sequence[str]) -> float:
    """Official accuracy in [0, 1] of one prediction against the human ``answers``."""
    if isinstance(answers, str) or len(answers) < 2:
        raise ValueError("VQA accuracy needs several human answers per question (VQA v2 has 10); "
                         "use exact_match_accuracy for single-answer datasets")
    pred = normalize_answer(prediction)
    gts = list(answers)
    if len(set(gts)) > 1:
        gts = [process_punctuation(a) for a in gts]
    accs = [min(1.0, sum(a == pred for k, a in enumerate(gts) if k != j) / 3) for j in range(len(gts))]
    return sum(accs) / len(accs)


def _aligned(predictions: Mapping[Any, str], answers: Mapping[Any, Any]) -> list[tuple[str, str, Any]]:
    """``(id, prediction, answers)`` for every question; ids compared as strings (JSON keys)."""
    preds = {str(k): v for k, v in predictions.items()}
    gts = {str(k): v for k, v in answers.items()}
    for name, missing in (("answers", preds.keys() - gts.keys()), ("prediction", gts.keys() - preds.keys())):
        if missing:
            shown = ", ".join(sorted(missing)[:5])
            raise KeyError(f"{len(missing)} question id(s) have no {name}: {shown}{' ...' if len(missing) > 5 else ''}")
    if not preds:
        raise ValueError("no predictions to score")
    return [(k, preds[k], gts[k]) for k in sorted(gts)]


def _grouped_means(scores: dict[str, float], groups: Mapping[Any, str]) -> dict[str, float]:
    names = {str(k): str(v) for k, v in groups.items()}
    by_group: dict[str, list[float]] = defaultdict(list)
    for qid, score in scores.items():
        by_group[names[qid]].append(score)
    return {g: 100.0 * sum(v) / len(v) for g, v in sorted(by_group.items())}


def vqa_accuracy(
    predictions: Mapping[Any, str],
    answers: Mapping[Any, Sequence[str]],
    *,
    answer_types: Mapping[Any, str] | None = None,
    question_types: Mapping[Any, str] | None = None,
) -> dict[str, Any]:
    """Official VQA accuracy over a set of questions.

    Args:
        predictions: one predicted answer per question id.
        answers: the human answers of each question id (same ids as ``predictions``).
        answer_types: optional type per question id ("yes/no", "number", "other").
        question_types: optional type per question id ("what color is the", ...).

    Returns:
        ``{"overall": percent, "num_questions": n}`` plus ``"per_answer_type"`` /
        ``"per_question_type"`` (percent per type) when the types are given.
    """
    items = _aligned(predictions, answers)
    scores = {qid: vqa_score(pred, gts) for qid, pred, gts in items}
    out: dict[str, Any] = {"overall": 100.0 * sum(scores.values()) / len(scores), "num_questions": len(scores)}
    if answer_types is not None:
        out["per_answer_type"] = _grouped_means(scores, answer_types)
    if question_types is not None:
        out["per_question_type"] = _grouped_means(scores, question_types)
    return out


def exact_match_accuracy(predictions: Mapping[Any, str], answers: Mapping[Any, str | Sequence[str]]) -> dict[str, Any]:
    """Percent of questions whose normalised prediction equals a normalised answer.

    ``answers`` holds one answer per question id (or a list of accepted answers). Both sides
    go through `normalize_answer`, so "Two." matches "2" and "the red one" matches "red one".

    Returns:
        ``{"accuracy": percent, "num_questions": n}``.
    """
    items = _aligned(predictions, answers)
    correct = 0
    for _, pred, gts in items:
        accepted = {normalize_answer(a) for a in ([gts] if isinstance(gts, str) else gts)}
        correct += normalize_answer(pred) in accepted
    return {"accuracy": 100.0 * correct / len(items), "num_questions": len(items)}
