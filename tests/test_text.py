"""pre_caption / pre_question must match the original BLIP data/utils.py, quirks included."""

import pytest

from openblip.text import pre_caption, pre_question


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("A man (riding) a horse!!  On the beach.", "a man riding a horse on the beach"),
        # ? , ' - / are not in the punctuation set.
        ("Hello, World? It's fine-ish/ok", "hello, world? it's fine-ish/ok"),
        ("a~b*c#d:e;f", "a b c d e f"),
        ('He said "hi".', "he said hi"),
        # Replaced with a space, so words stay apart.
        ("end.start", "end start"),
        ("  leading and trailing  \n", "leading and trailing"),
        ("line one\n", "line one"),
        ("caption\n ", "caption"),
        # A single tab or newline is not collapsed (only runs of two or more are).
        ("a\tdog", "a\tdog"),
        ("a \tdog", "a dog"),
        ("tab at end\t", "tab at end\t"),
        ("Café ÉCLAIR", "café éclair"),
        ("", ""),
        ("...!!!", ""),
    ],
)
def test_pre_caption(raw: str, expected: str) -> None:
    assert pre_caption(raw) == expected


def test_pre_caption_truncates_words() -> None:
    words = [f"w{i}" for i in range(60)]
    assert pre_caption(" ".join(words)) == " ".join(words[:50])
    assert pre_caption(" ".join(words), max_words=30) == " ".join(words[:30])
    assert pre_caption("one two three", max_words=3) == "one two three"
    assert pre_caption("one two three", max_words=2) == "one two"


def test_pre_caption_tab_is_not_a_word_boundary() -> None:
    assert pre_caption("a\tb c d", max_words=2) == "a\tb c"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("What color is the man's shirt?", "what color is the man's shirt?"),
        # Deleted, not replaced: no space is inserted.
        ("Is this a.b.c test!", "is this abc test"),
        ("end.start", "endstart"),
        # Leading spaces are kept, trailing spaces removed, inner runs kept.
        ("  How many (dogs)?  ", "  how many dogs?"),
        ("two  spaces", "two  spaces"),
        ("what is this? .", "what is this?"),
        # Only spaces are stripped at the end.
        ("question\n", "question\n"),
        ("", ""),
    ],
)
def test_pre_question(raw: str, expected: str) -> None:
    assert pre_question(raw) == expected


def test_pre_question_truncates_words() -> None:
    words = [f"w{i}" for i in range(60)]
    assert pre_question(" ".join(words)) == " ".join(words[:50])
    assert pre_question("a b c d", max_words=3) == "a b c"


def test_pre_question_counts_empty_words() -> None:
    # "a  b  c".split(" ") == ["a", "", "b", "", "c"]: the empty strings count.
    assert pre_question("a  b  c", max_words=3) == "a  b"
