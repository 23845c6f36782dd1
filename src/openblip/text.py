"""Caption and question cleaning, reproducing the original BLIP (``data/utils.py``).

Both functions are applied to raw annotations before tokenization, in training
and in evaluation.  They are reproduced literally, quirks included, because the
published checkpoints were trained and evaluated on text cleaned this way.
"""

from __future__ import annotations

import re

__all__ = ["pre_caption", "pre_question"]

# The punctuation both functions remove: . ! " ( ) * # : ; ~
# Note what is *not* in the set: ? , ' - / and all other symbols are kept.
_PUNCTUATION = re.compile(r"([.!\"()*#:;~])")
# Two or more whitespace characters of any kind (space, tab, newline, ...).
_WHITESPACE_RUN = re.compile(r"\s{2,}")


def pre_caption(caption: str, max_words: int = 50) -> str:
    """Clean a caption as the original BLIP does.

    Steps, in order:

    1. lower-case;
    2. replace each of ``. ! " ( ) * # : ; ~`` with a space;
    3. replace every run of two or more whitespace characters with one space;
    4. ``rstrip("\\n")`` then ``strip(" ")``;
    5. keep the first ``max_words`` words, splitting on single spaces.

    Quirks kept on purpose: a *single* tab or newline inside the caption survives
    step 3 (only runs of two or more are collapsed) and is not a word boundary in
    step 5; only spaces and a trailing newline are stripped at the ends.

    The original configs use ``max_words=30`` for pretraining and COCO/Flickr
    retrieval and captioning, 40 for NLVR2; LAVIS uses 50.

    >>> pre_caption("A man (riding) a horse!!  On the beach.")
    'a man riding a horse on the beach'
    """
    caption = _PUNCTUATION.sub(" ", caption.lower())
    caption = _WHITESPACE_RUN.sub(" ", caption)
    caption = caption.rstrip("\n").strip(" ")
    return _truncate_words(caption, max_words)


def pre_question(question: str, max_words: int = 50) -> str:
    """Clean a VQA question as the original BLIP does.

    Steps, in order:

    1. lower-case;
    2. *delete* each of ``. ! " ( ) * # : ; ~`` (no space is inserted, so
       ``"a.b"`` becomes ``"ab"``);
    3. ``rstrip(" ")`` (leading spaces are kept);
    4. keep the first ``max_words`` words, splitting on single spaces.

    Quirks kept on purpose: unlike :func:`pre_caption`, whitespace is *not*
    collapsed, so repeated spaces stay and each extra space counts as an empty
    "word" in step 4; ``?`` is not in the punctuation set and is kept.

    >>> pre_question("What color is the man's shirt?")
    "what color is the man's shirt?"
    """
    question = _PUNCTUATION.sub("", question.lower())
    question = question.rstrip(" ")
    return _truncate_words(question, max_words)


def _truncate_words(text: str, max_words: int) -> str:
    # str.split(" ") (not split()) as in the original: empty strings between
    # consecutive spaces count as words.
    words = text.split(" ")
    if len(words) > max_words:
        return " ".join(words[:max_words])
    return text
