"""The BLIP text tokenizer: bert-base-uncased WordPiece plus ``[DEC]`` and ``[ENC]``.

BLIP uses the bert-base-uncased tokenizer with two extra special tokens appended
after the 30,522-entry vocabulary: ``[DEC]`` (id 30522, the decoder's BOS token)
and ``[ENC]`` (id 30523, the first token of image-grounded encoder inputs).  The
tokenizer always emits ``[CLS] ... [SEP]``; the models then overwrite position 0
with ``[ENC]`` or ``[DEC]`` depending on the mode (reference A.4).

This module only depends on the ``tokenizers`` library, so that inference does
not need ``transformers``; the output is id-for-id identical to
``BertTokenizer.from_pretrained("bert-base-uncased")`` with the same two tokens
added, and directories written by :meth:`BlipTokenizer.save_pretrained` load in
``transformers.AutoTokenizer``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece

__all__ = [
    "BERT_BASE_VOCAB_SIZE",
    "BlipTokenizer",
    "DEC_TOKEN",
    "ENC_TOKEN",
    "default_vocab_path",
]

PAD_TOKEN = "[PAD]"
UNK_TOKEN = "[UNK]"
CLS_TOKEN = "[CLS]"
SEP_TOKEN = "[SEP]"
MASK_TOKEN = "[MASK]"
DEC_TOKEN = "[DEC]"
ENC_TOKEN = "[ENC]"
BERT_SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN, CLS_TOKEN, SEP_TOKEN, MASK_TOKEN)

BERT_BASE_VOCAB_SIZE = 30522
MODEL_MAX_LENGTH = 512
MAX_INPUT_CHARS_PER_WORD = 100

VOCAB_FILE = "vocab.txt"
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
LEGACY_ADDED_TOKENS_FILE = "added_tokens.json"

Padding = Literal["longest", "max_length"]
FirstToken = Literal["cls", "enc", "dec"]


def default_vocab_path() -> Path:
    """Path of the bundled bert-base-uncased ``vocab.txt``."""
    return Path(__file__).resolve().parent / "assets" / "bert-base-uncased-vocab.txt"


def _read_vocab_file(path: str | Path) -> list[str]:
    # One token per line, id = line number; same parsing as transformers' load_vocab.
    with open(path, encoding="utf-8") as handle:
        return [line.rstrip("\n") for line in handle]


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _special(content: str) -> AddedToken:
    # normalized=False: the literal text "[SEP]" is matched before lower-casing,
    # exactly as transformers registers special tokens.
    return AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)


def _clean_up_tokenization(text: str) -> str:
    """transformers' ``clean_up_tokenization`` (used when ``clean_up_tokenization_spaces=True``)."""
    return (
        text.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
    )


def _to_id_list(ids: Any) -> list[int]:
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    if isinstance(ids, int):
        return [ids]
    return [int(i) for i in ids]


class BlipTokenizer:
    """bert-base-uncased WordPiece tokenizer with BLIP's ``[DEC]``/``[ENC]`` tokens.

    Build it with :meth:`default`, :meth:`from_vocab` or :meth:`from_pretrained`
    rather than calling the constructor directly.

    Args:
        vocab: base WordPiece vocabulary; the id of a token is its position.
        added_tokens: ``(content, special)`` pairs appended after ``vocab`` in
            this order (ids ``len(vocab)``, ``len(vocab) + 1``, ...).  ``[DEC]`` and
            ``[ENC]`` are appended automatically when missing.
        do_lower_case: lower-case and strip accents (the "uncased" BERT normaliser).
        model_max_length: truncation length used when ``max_length`` is not given.
    """

    def __init__(
        self,
        vocab: Sequence[str],
        added_tokens: Sequence[tuple[str, bool]] = (),
        *,
        do_lower_case: bool = True,
        model_max_length: int = MODEL_MAX_LENGTH,
    ) -> None:
        self._base_vocab = list(vocab)
        self.do_lower_case = do_lower_case
        self.model_max_length = model_max_length
        self._added = _complete_added_tokens(self._base_vocab, added_tokens)
        self._tokenizer = _build_backend(self._base_vocab, self._added, do_lower_case)
        self._check_ids()

    # ------------------------------------------------------------------ constructors

    @classmethod
    def default(cls) -> BlipTokenizer:
        """The standard BLIP tokenizer from the bundled vocabulary (built once, then cached).

        The instance holds no per-call state, so sharing it is safe.
        """
        return _default_tokenizer()

    @classmethod
    def from_vocab(cls, path: str | Path, *, do_lower_case: bool = True) -> BlipTokenizer:
        """Build from a BERT ``vocab.txt`` (one token per line)."""
        return cls(_read_vocab_file(path), do_lower_case=do_lower_case)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> BlipTokenizer:
        """Read a Hugging Face tokenizer directory.

        ``vocab.txt`` is preferred, ``tokenizer.json`` is the fallback.  Added tokens
        already present in the directory (``tokenizer.json``, ``added_tokens_decoder``
        of ``tokenizer_config.json``, or the legacy ``added_tokens.json``) keep their
        ids.  The hub BLIP repositories ship the plain 30,522-token bert-base-uncased
        files, so ``[DEC]``/``[ENC]`` are appended when missing.

        Raises:
            FileNotFoundError: neither ``vocab.txt`` nor ``tokenizer.json`` exists.
            ValueError: the files are inconsistent, or a 30,522-token base vocabulary
                would not give ``[DEC]`` = 30522 and ``[ENC]`` = 30523.
        """
        directory = Path(directory)
        config = _read_json(directory / CONFIG_FILE)
        backend_json = _read_json(directory / TOKENIZER_FILE)
        if (directory / VOCAB_FILE).is_file():
            vocab = _read_vocab_file(directory / VOCAB_FILE)
        elif backend_json:
            vocab = _vocab_from_tokenizer_json(backend_json)
        else:
            raise FileNotFoundError(f"no {VOCAB_FILE} or {TOKENIZER_FILE} in {directory}")
        added = _added_tokens_from_files(directory, config, backend_json, len(vocab))
        return cls(
            vocab,
            added,
            do_lower_case=_do_lower_case(config, backend_json),
            model_max_length=_model_max_length(config),
        )

    def save_pretrained(self, directory: str | Path) -> list[Path]:
        """Write ``vocab.txt``, ``tokenizer.json``, ``tokenizer_config.json`` and
        ``special_tokens_map.json`` to ``directory`` (created if needed).

        ``vocab.txt`` holds only the base vocabulary; the added tokens live in
        ``tokenizer.json`` and in ``added_tokens_decoder``, which is how transformers
        stores them, so both this class and ``transformers.AutoTokenizer`` read the
        directory back with identical ids.

        Returns:
            The written paths.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = [directory / name for name in (VOCAB_FILE, TOKENIZER_FILE, CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE)]
        paths[0].write_text("".join(f"{token}\n" for token in self._base_vocab), encoding="utf-8")
        self._tokenizer.save(str(paths[1]))
        _write_json(paths[2], self._tokenizer_config())
        _write_json(paths[3], self._special_tokens_map())
        return paths

    # ------------------------------------------------------------------ properties

    @property
    def backend_tokenizer(self) -> Tokenizer:
        """The underlying ``tokenizers.Tokenizer`` (do not mutate it)."""
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (30,524 for BLIP)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def pad_token_id(self) -> int:
        return self._id(PAD_TOKEN)

    @property
    def unk_token_id(self) -> int:
        return self._id(UNK_TOKEN)

    @property
    def cls_token_id(self) -> int:
        return self._id(CLS_TOKEN)

    @property
    def sep_token_id(self) -> int:
        """``[SEP]``, also the end-of-sequence token for generation."""
        return self._id(SEP_TOKEN)

    @property
    def eos_token_id(self) -> int:
        """Alias of :attr:`sep_token_id` (BLIP generates until ``[SEP]``)."""
        return self.sep_token_id

    @property
    def mask_token_id(self) -> int:
        return self._id(MASK_TOKEN)

    @property
    def dec_token_id(self) -> int:
        """``[DEC]``: first token of every decoder input."""
        return self._id(DEC_TOKEN)

    @property
    def bos_token_id(self) -> int:
        """Alias of :attr:`dec_token_id` (BLIP registers ``[DEC]`` as the BOS token)."""
        return self.dec_token_id

    @property
    def enc_token_id(self) -> int:
        """``[ENC]``: first token of image-grounded encoder inputs."""
        return self._id(ENC_TOKEN)

    @property
    def all_special_ids(self) -> list[int]:
        """Ids skipped by ``decode(..., skip_special_tokens=True)``."""
        decoder = self._tokenizer.get_added_tokens_decoder()
        return sorted(i for i, token in decoder.items() if token.special)

    def get_vocab(self) -> dict[str, int]:
        """Token -> id mapping, added tokens included."""
        return self._tokenizer.get_vocab(with_added_tokens=True)

    # ------------------------------------------------------------------ encoding

    def __call__(
        self,
        texts: str | Sequence[str],
        *,
        max_length: int | None = None,
        padding: Padding = "longest",
        truncation: bool = True,
        first_token: FirstToken = "cls",
        return_tensors: Literal["pt"] | None = "pt",
    ) -> dict[str, Any]:
        """Tokenize one text or a batch into ``[CLS] tokens [SEP]`` rows.

        Args:
            texts: a string or a sequence of strings.
            max_length: truncation length (special tokens included) and, with
                ``padding="max_length"``, the padded length.  Defaults to
                ``model_max_length`` (512) for truncation.
            padding: ``"longest"`` pads to the longest row of the batch;
                ``"max_length"`` pads to ``max_length`` (rows longer than it only
                occur with ``truncation=False`` and then set the width).
            truncation: cut the tokens so that rows fit in ``max_length``; the final
                ``[SEP]`` is always kept, as transformers does.
            first_token: what position 0 holds: ``"cls"`` (unimodal text encoder),
                ``"enc"`` (image-grounded encoder) or ``"dec"`` (decoder).  BLIP
                overwrites ``[CLS]`` rather than inserting a token, so lengths do
                not change.
            return_tensors: ``"pt"`` for ``torch.long`` tensors, ``None`` for lists.

        Returns:
            ``{"input_ids": (B, L), "attention_mask": (B, L)}``, right-padded with
            ``pad_token_id`` (0) and mask 0.
        """
        batch = [texts] if isinstance(texts, str) else list(texts)
        _check_call_args(padding, max_length, first_token, return_tensors)
        rows = [encoding.ids for encoding in self._tokenizer.encode_batch(batch, add_special_tokens=True)]
        if truncation:
            rows = [self._truncate(row, max_length or self.model_max_length) for row in rows]
        rows = [self._set_first_token(row, first_token) for row in rows]
        width = max((len(row) for row in rows), default=0)
        if padding == "max_length":
            width = max(width, max_length)  # type: ignore[type-var]
        input_ids = [row + [self.pad_token_id] * (width - len(row)) for row in rows]
        attention_mask = [[1] * len(row) + [0] * (width - len(row)) for row in rows]
        if return_tensors == "pt":
            shape = (len(rows), width)
            return {
                "input_ids": torch.tensor(input_ids, dtype=torch.long).reshape(shape),
                "attention_mask": torch.tensor(attention_mask, dtype=torch.long).reshape(shape),
            }
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def _truncate(self, row: list[int], max_length: int) -> list[int]:
        if max_length < 2:
            raise ValueError(f"max_length must leave room for [CLS] and [SEP], got {max_length}")
        if len(row) <= max_length:
            return row
        # Cut the content, then close with [SEP] like transformers' truncation.
        return row[: max_length - 1] + [self.sep_token_id]

    def _set_first_token(self, row: list[int], first_token: FirstToken) -> list[int]:
        if first_token == "cls":
            return row
        first = self.enc_token_id if first_token == "enc" else self.dec_token_id
        return [first, *row[1:]]

    def encode_prompt(self, prompt: str) -> list[int]:
        """Ids of ``[DEC] <prompt tokens>`` without the trailing ``[SEP]``.

        This is the caption-generation prefix of the original BLIP:
        ``encode_prompt("a picture of ")`` is ``[30522, 1037, 3861, 1997]``.
        """
        ids = self._tokenizer.encode(prompt, add_special_tokens=True).ids
        return [self.dec_token_id, *ids[1:-1]]

    def tokenize(self, text: str) -> list[str]:
        """WordPiece tokens of ``text`` without ``[CLS]``/``[SEP]``."""
        return self._tokenizer.encode(text, add_special_tokens=False).tokens

    def convert_tokens_to_ids(self, tokens: str | Iterable[str]) -> int | list[int]:
        """Id of one token or ids of several; unknown tokens map to ``[UNK]``."""
        if isinstance(tokens, str):
            return self._token_id_or_unk(tokens)
        return [self._token_id_or_unk(token) for token in tokens]

    def convert_ids_to_tokens(self, ids: int | Iterable[int] | torch.Tensor) -> str | list[str]:
        """Token string of one id or of several."""
        if isinstance(ids, int):
            return self._token(ids)
        return [self._token(i) for i in _to_id_list(ids)]

    # ------------------------------------------------------------------ decoding

    def decode(
        self,
        ids: Iterable[int] | torch.Tensor,
        skip_special_tokens: bool = True,
        clean_up_tokenization_spaces: bool = False,
    ) -> str:
        """Turn ids back into text, as transformers' ``BertTokenizer.decode`` does.

        WordPiece pieces are merged and spaces before ``. ? ! ,`` are removed by the
        WordPiece decoder.  ``clean_up_tokenization_spaces`` defaults to ``False``,
        the transformers 5.x default for this vocabulary and what ``BlipProcessor``
        then produces ("a dog ' s toy"); ``True`` reproduces transformers 4.x and
        the original BLIP ("a dog's toy").  With ``skip_special_tokens`` every
        special token is dropped: ``[PAD] [UNK] [CLS] [SEP] [MASK] [DEC] [ENC]``.
        """
        text = self._tokenizer.decode(_to_id_list(ids), skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if clean_up_tokenization_spaces else text

    def batch_decode(
        self,
        sequences: Iterable[Iterable[int]] | torch.Tensor,
        skip_special_tokens: bool = True,
        clean_up_tokenization_spaces: bool = False,
    ) -> list[str]:
        """:meth:`decode` applied to each row of a batch (list of lists or 2-D tensor)."""
        if isinstance(sequences, torch.Tensor):
            sequences = sequences.tolist()
        options = dict(skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=clean_up_tokenization_spaces)
        return [self.decode(row, **options) for row in sequences]

    # ------------------------------------------------------------------ internals

    def _id(self, token: str) -> int:
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise KeyError(f"{token} is not in the vocabulary")
        return token_id

    def _token_id_or_unk(self, token: str) -> int:
        token_id = self._tokenizer.token_to_id(token)
        return self.unk_token_id if token_id is None else token_id

    def _token(self, token_id: int) -> str:
        token = self._tokenizer.id_to_token(token_id)
        if token is None:
            raise IndexError(f"id {token_id} is outside the vocabulary of size {self.vocab_size}")
        return token

    def _check_ids(self) -> None:
        missing = [t for t in BERT_SPECIAL_TOKENS if t not in self._base_vocab]
        if missing:
            raise ValueError(f"the vocabulary lacks the BERT special tokens {missing}")
        for offset, (content, _) in enumerate(self._added):
            expected = len(self._base_vocab) + offset
            if self._tokenizer.token_to_id(content) != expected:
                raise ValueError(
                    f"added token {content!r} did not get id {expected}; is it also in the base vocabulary?"
                )
        # The published checkpoints have 30,524-row embeddings with [DEC]/[ENC] in the last two rows.
        if len(self._base_vocab) == BERT_BASE_VOCAB_SIZE and (self.dec_token_id, self.enc_token_id) != (30522, 30523):
            raise ValueError(
                f"a {BERT_BASE_VOCAB_SIZE}-token base vocabulary must give [DEC]=30522 and [ENC]=30523, "
                f"got [DEC]={self.dec_token_id} and [ENC]={self.enc_token_id}"
            )

    def _tokenizer_config(self) -> dict[str, Any]:
        decoder = self._tokenizer.get_added_tokens_decoder()
        return {
            "tokenizer_class": "BertTokenizer",
            "do_lower_case": self.do_lower_case,
            "do_basic_tokenize": True,
            "never_split": None,
            "tokenize_chinese_chars": True,
            "strip_accents": None,
            "unk_token": UNK_TOKEN,
            "sep_token": SEP_TOKEN,
            "pad_token": PAD_TOKEN,
            "cls_token": CLS_TOKEN,
            "mask_token": MASK_TOKEN,
            "bos_token": DEC_TOKEN,
            "additional_special_tokens": [ENC_TOKEN],
            "model_max_length": self.model_max_length,
            # Pin decoding so that transformers 4.x and 5.x read the directory alike.
            "clean_up_tokenization_spaces": False,
            "added_tokens_decoder": {str(i): _added_token_dict(decoder[i]) for i in sorted(decoder)},
        }

    def _special_tokens_map(self) -> dict[str, Any]:
        return {
            "unk_token": UNK_TOKEN,
            "sep_token": SEP_TOKEN,
            "pad_token": PAD_TOKEN,
            "cls_token": CLS_TOKEN,
            "mask_token": MASK_TOKEN,
            "bos_token": DEC_TOKEN,
            "additional_special_tokens": [ENC_TOKEN],
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(vocab_size={self.vocab_size}, do_lower_case={self.do_lower_case}, "
            f"dec_token_id={self.dec_token_id}, enc_token_id={self.enc_token_id})"
        )


# ---------------------------------------------------------------------- module internals


@functools.lru_cache(maxsize=1)
def _default_tokenizer() -> BlipTokenizer:
    return BlipTokenizer.from_vocab(default_vocab_path())


def _check_call_args(padding: str, max_length: int | None, first_token: str, return_tensors: str | None) -> None:
    if padding not in ("longest", "max_length"):
        raise ValueError(f"padding must be 'longest' or 'max_length', got {padding!r}")
    if padding == "max_length" and max_length is None:
        raise ValueError("padding='max_length' needs max_length")
    if first_token not in ("cls", "enc", "dec"):
        raise ValueError(f"first_token must be 'cls', 'enc' or 'dec', got {first_token!r}")
    if return_tensors not in ("pt", None):
        raise ValueError(f"return_tensors must be 'pt' or None, got {return_tensors!r}")


def _complete_added_tokens(vocab: Sequence[str], added: Sequence[tuple[str, bool]]) -> list[tuple[str, bool]]:
    """Append ``[DEC]`` then ``[ENC]`` unless already present; both are always special."""
    present = set(vocab)
    result = [(content, special or content in (DEC_TOKEN, ENC_TOKEN)) for content, special in added]
    present.update(content for content, _ in result)
    for token in (DEC_TOKEN, ENC_TOKEN):
        if token not in present:
            result.append((token, True))
    return result


def _build_backend(vocab: Sequence[str], added: Sequence[tuple[str, bool]], do_lower_case: bool) -> Tokenizer:
    """The same pipeline as transformers' ``BertTokenizer`` (tokenizers backend)."""
    token_to_id = {token: i for i, token in enumerate(vocab)}
    backend = Tokenizer(WordPiece(token_to_id, unk_token=UNK_TOKEN, max_input_chars_per_word=MAX_INPUT_CHARS_PER_WORD))
    # strip_accents=None follows `lowercase`, as in the original BERT.
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=do_lower_case
    )
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{CLS_TOKEN}:0 $A:0 {SEP_TOKEN}:0",
        pair=f"{CLS_TOKEN}:0 $A:0 {SEP_TOKEN}:0 $B:1 {SEP_TOKEN}:1",
        special_tokens=[(CLS_TOKEN, token_to_id.get(CLS_TOKEN, 0)), (SEP_TOKEN, token_to_id.get(SEP_TOKEN, 0))],
    )
    # Registering the special tokens already in the vocabulary (ids are kept) makes a
    # literal "[SEP]" in text a single token and lets decode skip them.
    in_vocab = [token for token in (*BERT_SPECIAL_TOKENS, DEC_TOKEN, ENC_TOKEN) if token in token_to_id]
    backend.add_special_tokens([_special(token) for token in in_vocab])
    # One at a time, in id order: tokenizers assigns new ids in insertion order.
    for content, special in added:
        if special:
            backend.add_special_tokens([_special(content)])
        else:
            backend.add_tokens([AddedToken(content, normalized=True, special=False)])
    return backend


def _vocab_from_tokenizer_json(backend_json: Mapping[str, Any]) -> list[str]:
    model = backend_json.get("model", {})
    if model.get("type") != "WordPiece":
        raise ValueError(f"{TOKENIZER_FILE} holds a {model.get('type')!r} model, expected WordPiece")
    by_id = sorted(model["vocab"].items(), key=lambda item: item[1])
    if [i for _, i in by_id] != list(range(len(by_id))):
        raise ValueError(f"the WordPiece vocabulary of {TOKENIZER_FILE} does not have contiguous ids")
    return [token for token, _ in by_id]


def _added_tokens_from_files(
    directory: Path, config: Mapping[str, Any], backend_json: Mapping[str, Any], base_size: int
) -> list[tuple[str, bool]]:
    """Added tokens beyond the base vocabulary, in id order; ids must follow the base vocabulary."""
    by_id: dict[int, tuple[str, bool]] = {}
    for content, token_id in _read_json(directory / LEGACY_ADDED_TOKENS_FILE).items():
        by_id[int(token_id)] = (content, content in (DEC_TOKEN, ENC_TOKEN))
    for token_id, token in config.get("added_tokens_decoder", {}).items():
        by_id[int(token_id)] = (token["content"], bool(token.get("special", False)))
    for token in backend_json.get("added_tokens", []):
        by_id[int(token["id"])] = (token["content"], bool(token.get("special", False)))
    extra = {i: item for i, item in by_id.items() if i >= base_size}
    expected = list(range(base_size, base_size + len(extra)))
    if sorted(extra) != expected:
        raise ValueError(f"added tokens in {directory} have ids {sorted(extra)}; expected {expected}")
    return [extra[i] for i in expected]


def _do_lower_case(config: Mapping[str, Any], backend_json: Mapping[str, Any]) -> bool:
    if "do_lower_case" in config:
        return bool(config["do_lower_case"])
    normalizer = backend_json.get("normalizer") or {}
    if normalizer.get("type") == "BertNormalizer":
        return bool(normalizer.get("lowercase", True))
    return True


def _model_max_length(config: Mapping[str, Any]) -> int:
    value = config.get("model_max_length", MODEL_MAX_LENGTH)
    # transformers writes a huge sentinel (1e30) when the length is unknown.
    return int(value) if isinstance(value, (int, float)) and 0 < value <= 1_000_000 else MODEL_MAX_LENGTH


def _added_token_dict(token: AddedToken) -> dict[str, Any]:
    return {
        "content": token.content,
        "lstrip": token.lstrip,
        "normalized": token.normalized,
        "rstrip": token.rstrip,
        "single_word": token.single_word,
        "special": token.special,
    }


def _write_json(path: Path, payload: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
