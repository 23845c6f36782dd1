"""Caption metrics with coco-caption's scorers (pycocoevalcap): BLEU-1..4, CIDEr(-D), METEOR, SPICE.

BLEU and CIDEr use pycocoevalcap's Python scorers. coco-caption first tokenises with the
Stanford PTBTokenizer (Java); here `ptb_tokenize` does it in Python: lower-case, split off
punctuation and clitics as PTB does ("dog's" -> "dog 's", "don't" -> "do n't"), then drop the
tokens coco-caption drops. It agrees with the Java tokenizer on ordinary captions, but rare
constructs (abbreviations at the end of a sentence, unusual symbols) can be split
differently, so scores can differ slightly from the official pipeline. Pass
``tokenizer="ptb"`` to use the Java tokenizer bundled with pycocoevalcap instead.

METEOR (``meteor-1.5.jar``) and SPICE (``spice-1.0.jar``) are Java programs: they run only
when ``java`` is on PATH; SPICE also needs Java 8 and the Stanford CoreNLP 3.6.0 jars that
pycocoevalcap downloads on first use. Whatever is not computed is absent from the result and
explained in ``notes``.

Scores are on coco-caption's scale (BLEU in [0, 1], CIDEr about 0-10); papers report x100.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any, Literal

# Tokens coco-caption's PTBTokenizer wrapper removes after tokenisation (ptbtokenizer.py). With
# ``-lowerCase`` the bracket tokens come out as "-lrb-" etc. and are therefore kept, as here.
PTB_PUNCTUATIONS = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_QUOTES = {"\u201c": '"', "\u201d": '"', "\u2018": "'", "\u2019": "'", "\u2026": "..."}
_SPLITS = {"cannot": "can not", "gonna": "gon na", "wanna": "wan na", "gotta": "got ta"}
_ABBREVIATIONS = frozenset(["mr", "mrs", "ms", "dr", "st", "jr", "sr", "vs", "mt", "etc"])
_CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'m|'ll|'d)$")
_MISSING_EXTRA = "pycocoevalcap is not installed; install the evaluation extra: pip install openblip[eval]"


def _spaced(text: str) -> str:
    """Put spaces around the punctuation PTB makes separate tokens."""
    text = re.sub(r'"', " '' ", text)  # either `` or '': both are dropped
    text = re.sub(r"[()\[\]{}]", lambda m: f" {_BRACKETS[m.group()]} ", text)
    text = re.sub(r"\.\.+", " ... ", text)
    text = re.sub(r"--+", " -- ", text)
    text = re.sub(r"[!?]+", lambda m: f" {m.group()} ", text)
    text = re.sub(r"[;$%#@]", lambda m: f" {m.group()} ", text)
    # Commas and colons stay inside numbers ("1,000", "10:30").
    return re.sub(r"(?<!\d)[,:]|[,:](?!\d)", lambda m: f" {m.group()} ", text)


def _word(token: str) -> list[str]:
    """Split one whitespace token: final period, quotes, clitics."""
    if token in _SPLITS:
        return _SPLITS[token].split()
    tail: list[str] = []
    if token.endswith(".") and token.strip(".") and not re.fullmatch(r"(?:[a-z]\.){2,}", token):
        if token[:-1] not in _ABBREVIATIONS:
            token, tail = token[:-1], ["."]
    head: list[str] = []
    if token.startswith("'") and len(token) > 1 and not _CLITIC.match("x" + token):
        token, head = token[1:], ["`"]
    if token.endswith("'") and len(token) > 1:
        token, tail = token[:-1], ["'", *tail]
    match = _CLITIC.match(token)
    body = [match.group(1), match.group(2)] if match else [token]
    return head + body + tail


def ptb_tokenize(text: str) -> str:
    """Lower-cased, PTB-style tokens joined by spaces, coco-caption punctuation removed.

    >>> ptb_tokenize("A dog's toy, on the grass.")
    "a dog 's toy on the grass"
    """
    text = text.replace("\n", " ").lower()
    for src, dst in _QUOTES.items():
        text = text.replace(src, dst)
    tokens = [piece for token in _spaced(text).split() for piece in _word(token)]
    return " ".join(t for t in tokens if t not in PTB_PUNCTUATIONS)


def _java_tokenize(captions: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})


def _java_version() -> int | None:
    """Major version of the ``java`` on PATH, or None when there is none."""
    if shutil.which("java") is None:
        return None
    out = subprocess.run(["java", "-version"], capture_output=True, text=True, check=False).stderr
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out)
    if not match:
        return 0
    major, minor = int(match.group(1)), int(match.group(2) or 0)
    return minor if major == 1 else major  # "1.8.0_x" is Java 8


def _check_ids(predictions: Mapping[Any, str], references: Mapping[Any, Sequence[str]]):
    """String-keyed copies (JSON turns int ids into strings); every id on both sides."""
    preds = {str(k): v for k, v in predictions.items()}
    refs = {str(k): list(v) for k, v in references.items()}
    for name, missing in (("references", preds.keys() - refs.keys()), ("predictions", refs.keys() - preds.keys())):
        if missing:
            shown = ", ".join(sorted(missing)[:5])
            raise KeyError(f"{len(missing)} id(s) have no {name}: {shown}{' ...' if len(missing) > 5 else ''}")
    if not preds:
        raise ValueError("no predictions to score")
    empty = [k for k, v in refs.items() if not v]
    if empty:
        raise ValueError(f"{len(empty)} id(s) have an empty reference list: {', '.join(sorted(empty)[:5])}")
    return preds, refs


def _tokenized(preds, refs, tokenizer: str) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    if tokenizer == "ptb":
        if shutil.which("java") is None:
            raise RuntimeError("tokenizer='ptb' runs the Stanford PTBTokenizer, which needs `java` on PATH")
        return {k: v[:1] for k, v in _java_tokenize({k: [v] for k, v in preds.items()}).items()}, _java_tokenize(refs)
    if tokenizer != "python":
        raise ValueError(f"tokenizer must be 'python' or 'ptb', got {tokenizer!r}")
    return {k: [ptb_tokenize(v)] for k, v in preds.items()}, {k: [ptb_tokenize(r) for r in v] for k, v in refs.items()}


def _meteor(gts, res) -> float:
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()
    try:
        return float(scorer.compute_score(gts, res)[0])
    finally:
        # Its __del__ stops the Java process but first takes a lock that a failed
        # compute_score leaves held, which would hang at garbage collection.
        if scorer.lock.locked():
            scorer.lock.release()
        del scorer


def _spice(gts, res) -> float:
    from pycocoevalcap.spice import spice as spice_module

    return float(spice_module.Spice().compute_score(gts, res)[0])


def _spice_jars_present() -> bool:
    from pycocoevalcap.spice import spice as spice_module

    lib = os.path.join(os.path.dirname(spice_module.__file__), "lib")
    return os.path.exists(os.path.join(lib, "stanford-corenlp-3.6.0.jar"))


def _java_metrics(gts, res, meteor: bool | None, spice: bool | None) -> tuple[dict[str, float], list[str]]:
    """METEOR and SPICE where Java allows; otherwise a note on why not."""
    scores: dict[str, float] = {}
    notes: list[str] = []
    java = _java_version()
    if java is None:
        if meteor is not False or spice is not False:
            notes.append("METEOR/SPICE need Java 8 (`java` on PATH); not computed")
        return scores, notes
    if meteor is not False:
        try:
            scores["METEOR"] = _meteor(gts, res)
        except Exception as exc:  # a Java failure should not lose BLEU/CIDEr
            notes.append(f"METEOR failed: {exc}")
    if spice is None and java != 8:
        notes.append(f"SPICE needs Java 8 (found Java {java}); not computed (spice=True tries anyway)")
    elif spice is not False:
        if not _spice_jars_present():
            notes.append("SPICE needs the Stanford CoreNLP 3.6.0 jars (run `python -m "
                         "pycocoevalcap.spice.get_stanford_models` once online); not computed")
        else:
            try:
                scores["SPICE"] = _spice(gts, res)
            except Exception as exc:
                notes.append(f"SPICE failed: {exc}")
    return scores, notes


def caption_scores(
    predictions: Mapping[Any, str],
    references: Mapping[Any, Sequence[str]],
    *,
    meteor: bool | None = None,
    spice: bool | None = None,
    tokenizer: Literal["python", "ptb"] = "python",
) -> dict[str, Any]:
    """Corpus caption metrics as coco-caption computes them.

    Args:
        predictions: one generated caption per image id.
        references: the ground-truth captions of each image id; ids are compared as strings
            and must be the same set as in ``predictions``.
        meteor: compute METEOR (Java); None means "when java is on PATH".
        spice: compute SPICE (Java 8 + CoreNLP jars); None means "when Java 8 is on PATH".
        tokenizer: "python" (`ptb_tokenize`, no Java) or "ptb" (the Java PTBTokenizer, as coco-caption).

    Returns:
        ``{"BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "CIDEr", ["METEOR"], ["SPICE"], "notes": [str]}``;
        BLEU is corpus BLEU with the closest reference length; CIDEr is CIDEr-D (sigma 6,
        clipped counts, idf from these references, x10), so it is 0 for a single image.

    Raises:
        KeyError: an id has no prediction or no references.
        ImportError: pycocoevalcap is not installed.
    """
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
    except ImportError as exc:
        raise ImportError(_MISSING_EXTRA) from exc
    preds, refs = _check_ids(predictions, references)
    res, gts = _tokenized(preds, refs, tokenizer)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out: dict[str, Any] = {f"BLEU_{n}": float(b) for n, b in enumerate(bleu, start=1)}
    out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    extra, notes = _java_metrics(gts, res, meteor, spice)
    out.update(extra)
    if tokenizer == "python":
        notes.insert(0, "tokenised in Python (PTB-style); scores can differ slightly from the Java PTBTokenizer")
    out["notes"] = notes
    return out
