"""The user-facing BLIP object: a model with its tokenizer and image transform.

>>> import openblip
>>> blip = openblip.load("Salesforce/blip-image-captioning-base")
>>> blip.caption("photo.jpg")
'a woman sitting on the beach with her dog'

Every method takes one image or a list (paths, bytes or PIL images) and one
text or a list; a single input gives a single result.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from .images import load_image
from .models.blip import BlipModel
from .models.generation import GenerationConfig, generate
from .models.vqa import rank_answers
from .text import pre_question
from .tokenizer import BlipTokenizer
from .transforms import eval_transform

ImageLike = str | os.PathLike | bytes | Image.Image
DEFAULT_MODEL = "Salesforce/blip-image-captioning-base"
TEXT_MAX_LENGTH = 35  # retrieval / ITM / VQA question length of the original


@dataclass
class MatchScores:
    """Scores of every image against every text, each ``(num_images, num_texts)``.

    ``itm``: probability that the pair matches (softmax of the ITM head, class 1).
    ``itc``: cosine similarity of the projected, normalised ITC features.
    """

    itm: torch.Tensor
    itc: torch.Tensor


@dataclass
class Features:
    """Embeddings of the feature-extractor face (LAVIS naming).

    ``image_embeds`` (B,N,Dv) and ``text_embeds`` (B,L,Dt) are raw tokens;
    ``*_proj`` are the normalised 256-d ITC features of the first token, the
    ones to compare across modalities; ``multimodal_embeds`` (B,L,Dt) are the
    image-grounded text tokens.
    """

    image_embeds: torch.Tensor | None = None
    image_embeds_proj: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    text_embeds_proj: torch.Tensor | None = None
    multimodal_embeds: torch.Tensor | None = None


def _as_list(x: Any) -> tuple[list, bool]:
    if isinstance(x, (list, tuple)):
        return list(x), False
    return [x], True


def _batches(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


class Blip:
    """A loaded BLIP model: captioning, image-text matching, VQA and embeddings."""

    def __init__(
        self,
        model: BlipModel,
        tokenizer: BlipTokenizer,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
    ) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = _dtype(dtype)
        self.model = model.to(self.device, self.dtype).eval()
        self.tokenizer = tokenizer
        self.transform = eval_transform(model.cfg.vision.image_size)

    @classmethod
    def from_pretrained(
        cls,
        source: str | os.PathLike = DEFAULT_MODEL,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        **load_kwargs: Any,
    ) -> "Blip":
        """Load a hub id, a transformers-format directory, an official ``.pth``
        or an openblip directory (see :func:`openblip.checkpoints.load_model`)."""
        from .checkpoints import load_model

        model, tokenizer = load_model(source, **load_kwargs)
        return cls(model, tokenizer, device=device, dtype=dtype)

    @property
    def config(self):
        return self.model.cfg

    @property
    def image_size(self) -> int:
        return self.model.cfg.vision.image_size

    # -- inputs -----------------------------------------------------------------
    def preprocess(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """Load and transform images into a ``(B, 3, S, S)`` batch on the model's device."""
        pixels = torch.stack([self.transform(load_image(im)) for im in images])
        return pixels.to(self.device, self.dtype)

    def _text(self, texts: Sequence[str], first_token: str, max_length: int | None = TEXT_MAX_LENGTH):
        enc = self.tokenizer(list(texts), max_length=max_length, first_token=first_token)
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def _grounded_token(self, first_token: str | None) -> str:
        return first_token or self.model.cfg.grounded_first_token

    # -- captioning ---------------------------------------------------------------
    @torch.inference_mode()
    def caption(
        self,
        images: ImageLike | Sequence[ImageLike],
        *,
        prompt: str | None = None,
        num_beams: int = 3,
        max_length: int = 20,
        min_length: int = 5,
        sample: bool = False,
        top_p: float = 0.9,
        top_k: int = 50,
        temperature: float = 1.0,
        repetition_penalty: float | None = None,
        length_penalty: float = 1.0,
        num_captions: int = 1,
        batch_size: int = 8,
        seed: int | None = None,
    ) -> str | list[str] | list[list[str]]:
        """Caption images; defaults are BLIP's COCO evaluation (beam 3, length 5-20).

        ``prompt`` defaults to the one the weights were trained with ("a picture
        of " for captioning checkpoints, none for pre-trained ones); it is
        stripped from the output, and ``""`` means no prompt. ``sample=True``
        uses nucleus sampling (``top_p``/``top_k``/``temperature``) with BLIP's
        repetition penalty 1.1 unless given. ``num_captions`` > 1 returns a list
        of captions per image (distinct samples, or the best beams).
        """
        items, single = _as_list(images)
        prompt_ids, gen = self.caption_settings(
            prompt=prompt, num_beams=num_beams, max_length=max_length, min_length=min_length, sample=sample,
            top_p=top_p, top_k=top_k, temperature=temperature, repetition_penalty=repetition_penalty,
            length_penalty=length_penalty, num_captions=num_captions,
        )
        out: list[str] = []
        for part in _batches(len(items), batch_size):
            # One random stream per image (seed + its position): samples do not depend on batching.
            generators = None if seed is None else [torch.Generator().manual_seed(seed + i)
                                                    for i in range(part.start, part.stop)]
            out.extend(self.caption_pixels(self.preprocess(items[part]), prompt_ids, gen, generators))
        if num_captions > 1:
            out = [out[i : i + num_captions] for i in range(0, len(out), num_captions)]
        return out[0] if single else out

    def caption_settings(
        self,
        *,
        prompt: str | None = None,
        num_beams: int = 3,
        max_length: int = 20,
        min_length: int = 5,
        sample: bool = False,
        top_p: float = 0.9,
        top_k: int = 50,
        temperature: float = 1.0,
        repetition_penalty: float | None = None,
        length_penalty: float = 1.0,
        num_captions: int = 1,
    ) -> tuple[list[int], GenerationConfig]:
        """Prompt ids and decoding settings for :meth:`caption_pixels` (arguments as :meth:`caption`)."""
        prompt = self.default_prompt if prompt is None else prompt
        if num_beams < 1:  # checked here: max(num_beams, num_captions) below would hide it
            raise ValueError(f"num_beams must be at least 1, got {num_beams}")
        gen = GenerationConfig(
            max_length=max_length,
            min_length=min_length,
            num_beams=1 if sample else max(num_beams, num_captions),
            do_sample=sample,
            top_p=top_p,
            top_k=top_k,
            temperature=temperature,
            repetition_penalty=repetition_penalty if repetition_penalty is not None else (1.1 if sample else 1.0),
            length_penalty=length_penalty,
            num_return_sequences=num_captions,
            eos_token_id=self.tokenizer.sep_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        prompt_ids = self.tokenizer.encode_prompt(prompt)
        gen.validate(len(prompt_ids))
        return prompt_ids, gen

    @property
    def default_prompt(self) -> str:
        return self.model.cfg.prompt if self.model.cfg.task == "caption" else ""

    def caption_pixels(
        self,
        pixels: torch.Tensor,
        prompt_ids: list[int],
        gen: GenerationConfig,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
    ) -> list[str]:
        """Caption a preprocessed batch; returns ``B * num_return_sequences`` strings.

        ``generator``: for sampling, one generator, or one CPU generator per image.
        """
        if self.model.cfg.decoder_cross != "image":
            raise ValueError("this is a VQA model: its decoder reads questions, not images; use answer()")
        image_embeds = self.model.encode_image(pixels)
        cross_kv = self.model.decoder_cross_kv(image_embeds, gen.rows_per_input)
        prompt = torch.tensor([prompt_ids], device=self.device).expand(pixels.shape[0], -1)
        seqs = generate(self.model.part("text_decoder", "captioning"), cross_kv, prompt, gen, generator=generator)
        # Strip the prompt by tokens (the original sliced characters of the decoded text).
        return [self.tokenizer.decode(s[len(prompt_ids) :], clean_up_tokenization_spaces=True).strip() for s in seqs]

    # -- matching -----------------------------------------------------------------
    @torch.inference_mode()
    def match(
        self,
        images: ImageLike | Sequence[ImageLike],
        texts: str | Sequence[str],
        *,
        first_token: str | None = None,
        batch_size: int = 8,
    ) -> MatchScores:
        """Score every image against every text with ITM and ITC (see :class:`MatchScores`).

        The image is encoded, and its cross-attention keys/values computed, once
        for all texts. ``first_token`` ("enc"/"cls") overrides the token put
        before the text for ITM (BLIP trained with [ENC]).
        """
        items, _ = _as_list(images)
        texts, _ = _as_list(texts)
        ids, mask = self._text(texts, "cls")
        text_feat = None
        if self.model.cfg.has_itc:
            text_feat = self.model.project_text(self.model.encode_text(ids, mask))  # (T,E)
        g_ids = ids.clone()
        g_ids[:, 0] = self._token_id(self._grounded_token(first_token))
        itm_rows, itc_rows = [], []
        for part in _batches(len(items), batch_size):
            image_embeds = self.model.encode_image(self.preprocess(items[part]))
            for i in range(image_embeds.shape[0]):
                cross_kv = self.model.image_cross_kv(image_embeds[i : i + 1])
                logits = self.model.itm_logits(self.model.encode_grounded(g_ids, mask, cross_kv=cross_kv))
                itm_rows.append(logits.float().softmax(dim=-1)[:, 1])
            if text_feat is not None:
                itc_rows.append(self.model.project_image(image_embeds).float() @ text_feat.float().T)
        itc = torch.cat(itc_rows) if itc_rows else torch.full((len(items), len(texts)), float("nan"))
        return MatchScores(itm=torch.stack(itm_rows).cpu(), itc=itc.cpu())

    def _token_id(self, name: str) -> int:
        return {"enc": self.tokenizer.enc_token_id, "cls": self.tokenizer.cls_token_id}[name]

    # -- VQA ------------------------------------------------------------------------
    @torch.inference_mode()
    def answer(
        self,
        images: ImageLike | Sequence[ImageLike],
        questions: str | Sequence[str],
        *,
        answers: Sequence[str] | None = None,
        k: int = 128,
        num_beams: int = 3,
        max_length: int = 10,
        min_length: int = 1,
        first_token: str | None = None,
        clean_question: bool = True,
        batch_size: int = 8,
    ) -> str | list[str]:
        """Answer one question per image (a single question is asked of every image).

        With ``answers`` (a candidate list) the answer is ranked as BLIP's VQA
        evaluation does (top-``k`` by first token, then teacher-forced loss);
        otherwise it is generated by beam search (beam 3, length 1-10, counting [DEC]).
        Questions are cleaned as in training (``pre_question``) unless
        ``clean_question=False``. Unlike the original generate path, the answer
        decoder masks question padding, so answers do not depend on batching.
        """
        items, single = _as_list(images)
        qs, q_single = _as_list(questions)
        if q_single:
            qs = qs * len(items)
        if len(qs) != len(items):
            raise ValueError(f"got {len(items)} images but {len(qs)} questions; give one question per image")
        if clean_question:
            qs = [pre_question(q) for q in qs]
        empty = [i for i, q in enumerate(qs) if not q.strip()]
        if empty:
            which = "the question" if q_single else f"question {empty[0]}"
            raise ValueError(f"{which} is empty" + (" once cleaned (pre_question)" if clean_question else ""))
        if k < 1:
            raise ValueError(f"k (candidates kept by first token) must be at least 1, got {k}")
        if self.model.cfg.decoder_cross != "question":
            raise ValueError("answer() needs a VQA model (e.g. Salesforce/blip-vqa-base or model_base_vqa_capfilt_large.pth)")
        if answers is not None and len(answers) == 0:
            raise ValueError("the candidate answer list is empty")
        # The candidates (or the decoding settings) are the same for every batch: prepare them once.
        ranked = self._text(list(answers), "dec", max_length=None) if answers is not None else None
        gen = GenerationConfig(max_length=max_length, min_length=min_length, num_beams=num_beams,
                               eos_token_id=self.tokenizer.sep_token_id, pad_token_id=self.tokenizer.pad_token_id)
        out: list[str] = []
        for part in _batches(len(items), batch_size):
            best = self._answer_batch(items[part], qs[part], self._grounded_token(first_token), ranked, k, gen)
            out.extend([answers[i] for i in best] if ranked is not None else best)
        return out[0] if single else out

    def _answer_batch(self, items, questions, first_token, ranked, k, gen) -> list:
        """Indices into the candidates (with ``ranked`` answer ids) or generated answers."""
        model = self.model
        image_embeds = model.encode_image(self.preprocess(items))
        q_ids, q_mask = self._text(questions, first_token)
        states = model.encode_grounded(q_ids, q_mask, image_embeds=image_embeds)  # (B,Lq,D)
        cross_kv = model.decoder_cross_kv(states)
        decoder = model.part("text_decoder", "VQA")
        if ranked is not None:
            return rank_answers(decoder, cross_kv, q_mask, *ranked, k=k).tolist()
        start = torch.full((len(items), 1), self.tokenizer.dec_token_id, device=self.device)
        seqs = generate(decoder, cross_kv, start, gen, cross_mask=q_mask)
        return [self.tokenizer.decode(s[1:], clean_up_tokenization_spaces=True).strip() for s in seqs]

    # -- embeddings ---------------------------------------------------------------------
    @torch.inference_mode()
    def embed_images(self, images: ImageLike | Sequence[ImageLike], *, batch_size: int = 16) -> torch.Tensor:
        """Normalised ITC image embeddings ``(N, 256)`` (cosine = dot product)."""
        items, single = _as_list(images)
        rows = [
            self.model.project_image(self.model.encode_image(self.preprocess(items[p]))).float()
            for p in _batches(len(items), batch_size)
        ]
        out = torch.cat(rows).cpu()
        return out[0] if single else out

    @torch.inference_mode()
    def embed_texts(self, texts: str | Sequence[str], *, batch_size: int = 256) -> torch.Tensor:
        """Normalised ITC text embeddings ``(N, 256)``."""
        items, single = _as_list(texts)
        rows = []
        for p in _batches(len(items), batch_size):
            ids, mask = self._text(items[p], "cls")
            rows.append(self.model.project_text(self.model.encode_text(ids, mask)).float())
        out = torch.cat(rows).cpu()
        return out[0] if single else out

    @torch.inference_mode()
    def extract_features(
        self,
        images: ImageLike | Sequence[ImageLike] | None = None,
        texts: str | Sequence[str] | None = None,
        *,
        first_token: str | None = None,
    ) -> Features:
        """Image, text and multimodal features (pairs images[i] with texts[i])."""
        feats = Features()
        m = self.model
        if images is not None:
            feats.image_embeds = m.encode_image(self.preprocess(_as_list(images)[0]))
            if m.cfg.has_itc:
                feats.image_embeds_proj = m.project_image(feats.image_embeds)
        if texts is not None:
            ids, mask = self._text(_as_list(texts)[0], "cls")
            feats.text_embeds = m.encode_text(ids, mask)
            if m.cfg.has_itc:
                feats.text_embeds_proj = m.project_text(feats.text_embeds)
            if feats.image_embeds is not None:
                if feats.image_embeds.shape[0] != ids.shape[0]:
                    raise ValueError("multimodal features pair images[i] with texts[i]: give as many of each")
                ids = ids.clone()
                ids[:, 0] = self._token_id(self._grounded_token(first_token))
                feats.multimodal_embeds = m.encode_grounded(ids, mask, image_embeds=feats.image_embeds)
        return feats


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype or torch.float32
    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(names)}")
    return names[dtype]


def load(source: str | os.PathLike = DEFAULT_MODEL, **kwargs: Any) -> Blip:
    """Load a BLIP model ready for inference; see :meth:`Blip.from_pretrained`."""
    return Blip.from_pretrained(source, **kwargs)
