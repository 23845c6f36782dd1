"""Checkpoint loading, saving and conversion (openblip.checkpoints), all offline.

Official-format fixtures come from tiny transformers models renamed back to the
Salesforce layout (tests/helpers_hf.py). Their widths are multiples of 64 because
official checkpoints do not record head counts: 64-dim heads are inferred.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers_hf import hf_to_official_state_dict, random_pixel_values, save_official

from openblip.checkpoints import (
    CheckpointError,
    HubUnavailableError,
    convert,
    detect_format,
    load_model,
    save_model,
)
from openblip.config import preset
from openblip.models.blip import BlipModel
from openblip.tokenizer import BlipTokenizer

transformers = pytest.importorskip("transformers")

KINDS = ("caption", "retrieval", "vqa")
# Official-style widths: vision 128 (2 heads), text 64 (1 head); VQA needs equal widths.
OFFICIAL_SIZES = {
    "caption": dict(vision_width=128, vision_heads=2, text_width=64, text_heads=1, vision_eps=1e-6),
    "retrieval": dict(vision_width=128, vision_heads=2, text_width=64, text_heads=1, vision_eps=1e-6),
    "vqa": dict(vision_width=64, vision_heads=1, text_width=64, text_heads=1, vision_eps=1e-6),
}
TEXT = "a dog sitting on the beach"


@pytest.fixture(scope="module")
def official(hf_blip, tmp_path_factory):
    """``kind -> (hf_dir, official .pth, hf_model, processor)`` for the same weights."""
    root = tmp_path_factory.mktemp("official")
    out = {}
    for kind in KINDS:
        directory, hf_model, processor = hf_blip(kind, **OFFICIAL_SIZES[kind])
        pth = save_official(hf_to_official_state_dict(hf_model.state_dict()), root / f"model_{kind}.pth")
        out[kind] = (directory, pth, hf_model, processor)
    return out


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@torch.no_grad()
def _outputs(model: BlipModel, image_size: int | None = None) -> dict[str, torch.Tensor]:
    """Every head the model has, on fixed inputs."""
    size = image_size or model.cfg.vision.image_size
    pixels = random_pixel_values(2, size, seed=3)
    ids = torch.tensor([[101, 1037, 3899, 3564, 102], [101, 2048, 8870, 102, 0]])
    mask = (ids != 0).long()
    image = model.encode_image(pixels)
    out = {"image": image}
    if model.cfg.has_text_encoder:
        grounded = model.encode_grounded(ids, mask, image_embeds=image)
        out["grounded"] = grounded
        if model.cfg.has_itm:
            out["itm"] = model.itm_logits(grounded)
        if model.cfg.has_itc:
            out["itc"] = model.project_image(image) @ model.project_text(model.encode_text(ids, mask)).T
    if model.cfg.has_text_decoder:
        states = out["grounded"] if model.cfg.decoder_cross == "question" else image
        out["lm"] = model.decode(ids, mask, states=states)[0]
    return out


def _assert_same_outputs(a: BlipModel, b: BlipModel) -> None:
    oa, ob = _outputs(a), _outputs(b)
    assert oa.keys() == ob.keys()
    for key in oa:
        assert torch.equal(oa[key], ob[key]), key


# -- official format -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_official_loads_like_hf(official, kind):
    hf_dir, pth, _, _ = official[kind]
    assert detect_format(pth) == "official" and detect_format(hf_dir) == "hf"
    from_hf, _ = load_model(hf_dir)
    from_pth, tokenizer = load_model(pth)
    assert from_pth.cfg.task == from_hf.cfg.task == kind
    assert from_pth.cfg.vision == from_hf.cfg.vision and from_pth.cfg.text == from_hf.cfg.text
    assert from_pth.cfg.decoder_cross == ("question" if kind == "vqa" else "image")
    assert from_pth.cfg.extra["source"]["format"] == "official"
    assert len(tokenizer) == 30524
    _same_state(from_pth, from_hf)
    _assert_same_outputs(from_pth, from_hf)


def _model_layout(task: str, tied: bool = False) -> BlipModel:
    sizes = dict(vision={"width": 128, "heads": 2}, text={"width": 64, "heads": 1})
    parts = {
        "pretrain": dict(tie_encoder_decoder=tied),
        "caption": dict(has_text_encoder=False, has_itc=False, has_itm=False),
        "retrieval": dict(has_text_decoder=False),
        "vqa": dict(has_itc=False, has_itm=False, decoder_cross="question"),
    }[task]
    torch.manual_seed(0)
    return BlipModel(preset("tiny", task=task, **sizes, **parts)).eval()


def _official_extras(sd: dict, task: str) -> dict:
    """What released files carry beyond the inference model (reference E.2)."""
    sd = dict(sd)
    for key in list(sd):
        if key.startswith(("visual_encoder.", "text_encoder.", "vision_proj.", "text_proj.")) and task in (
            "pretrain", "retrieval",
        ):
            head, rest = key.split(".", 1)
            sd[f"{head}_m.{rest}"] = sd[key].clone()
    for prefix in ("text_encoder.", "text_decoder.bert."):
        if f"{prefix}embeddings.position_embeddings.weight" in sd:
            sd[f"{prefix}embeddings.position_ids"] = torch.arange(64).unsqueeze(0)
    if "text_decoder.cls.predictions.bias" in sd:
        sd["text_decoder.cls.predictions.decoder.bias"] = sd["text_decoder.cls.predictions.bias"].clone()
    if task == "pretrain":
        sd.update(image_queue=torch.randn(32, 16), text_queue=torch.randn(32, 16), queue_ptr=torch.zeros(1))
    if task == "retrieval":
        sd.update(image_queue=torch.randn(32, 16), text_queue=torch.randn(32, 16))
        sd.update(idx_queue=torch.zeros(1, 16), ptr_queue=torch.zeros(1))
    return sd


@pytest.mark.parametrize("task,tied", [("pretrain", True), ("pretrain", False), ("caption", False),
                                       ("retrieval", False), ("vqa", False)])
def test_official_architecture_inference(tmp_path, task, tied):
    model = _model_layout(task, tied)
    pth = save_official(_official_extras(model.state_dict(), task), tmp_path / "m.pth")
    loaded, _ = load_model(pth)
    want, got = model.cfg, loaded.cfg
    assert (got.task, got.vision, got.text) == (task, want.vision, want.text)
    assert not want.has_itc or got.embed_dim == want.embed_dim
    flags = ("has_text_encoder", "has_text_decoder", "has_itc", "has_itm", "decoder_cross", "tie_encoder_decoder")
    assert {f: getattr(got, f) for f in flags} == {f: getattr(want, f) for f in flags}
    _same_state(loaded, model)
    _assert_same_outputs(loaded, model)


def test_pretrained_checkpoint_loads_for_each_task(tmp_path):
    pth = save_official(_official_extras(_model_layout("pretrain", True).state_dict(), "pretrain"), tmp_path / "p.pth")
    caption, _ = load_model(pth, task="caption")
    assert caption.cfg.task == "caption" and not hasattr(caption, "text_encoder") and not caption.cfg.has_itc
    retrieval, _ = load_model(pth, task="retrieval")
    assert not hasattr(retrieval, "text_decoder") and retrieval.cfg.has_itm
    with pytest.raises(CheckpointError, match="cannot load this checkpoint as task 'vqa'"):
        load_model(pth, task="vqa")  # vision width 128, text width 64
    with pytest.raises(CheckpointError, match="task"):
        convert(pth, tmp_path / "hf", format="hf")
    assert not (tmp_path / "hf").exists()
    convert(pth, tmp_path / "hf", format="hf", task="caption")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["BlipForConditionalGeneration"]
    with pytest.raises(CheckpointError, match="cannot be loaded as task"):
        load_model(tmp_path / "hf", task="retrieval")


def test_nlvr_checkpoint_is_rejected(tmp_path, official):
    sd = torch.load(official["retrieval"][1], weights_only=True)["model"]
    sd["text_encoder.encoder.layer.0.crossattention.self0.query.weight"] = torch.zeros(64, 64)
    with pytest.raises(CheckpointError, match="NLVR2"):
        load_model(save_official(sd, tmp_path / "nlvr.pth"))


# -- key checks ----------------------------------------------------------------------------


@pytest.fixture
def official_sd(official):
    return torch.load(official["caption"][1], weights_only=True)["model"]


def test_missing_key_is_named(tmp_path, official_sd):
    key = "text_decoder.bert.encoder.layer.1.output.dense.bias"
    del official_sd[key]
    pth = save_official(official_sd, tmp_path / "m.pth")
    with pytest.raises(CheckpointError, match=f"missing keys: {key}"):
        load_model(pth)
    with pytest.warns(UserWarning, match=key):
        load_model(pth, strict=False)


def test_weights_missing_from_a_checkpoint_are_initialised(tmp_path, official_sd):
    """Loading skips random initialisation only when the checkpoint sets every weight."""
    key = "text_decoder.bert.encoder.layer.1.output.dense.weight"
    kept = official_sd["text_decoder.bert.encoder.layer.0.output.dense.weight"].clone()
    del official_sd[key]
    with pytest.warns(UserWarning, match=key):
        model, _ = load_model(save_official(official_sd, tmp_path / "m.pth"), strict=False)
    weight = model.state_dict()[key]
    assert weight.isfinite().all() and 0.015 < weight.std() < 0.025  # BERT's normal(0, 0.02), not unset memory
    assert torch.equal(model.state_dict()["text_decoder.bert.encoder.layer.0.output.dense.weight"], kept)


def test_no_init_draws_nothing_and_is_per_thread():
    import threading

    from openblip import BlipModel, preset
    from openblip.models.skip_init import init_skipped, no_init

    torch.manual_seed(0)
    state = torch.get_rng_state()
    cfg = preset("tiny")
    cfg.has_itc = cfg.has_itm = False  # their heads are plain nn.Linear, initialised as usual
    with no_init():
        BlipModel(cfg)
        seen = []
        worker = threading.Thread(target=lambda: seen.append(init_skipped()))
        worker.start()
        worker.join()
    assert torch.equal(torch.get_rng_state(), state) and seen == [False] and not init_skipped()
    BlipModel(cfg)
    assert not torch.equal(torch.get_rng_state(), state)


def test_unexpected_key_is_named(tmp_path, official_sd):
    official_sd["text_decoder.bert.pooler.dense.weight"] = torch.zeros(64, 64)
    pth = save_official(official_sd, tmp_path / "m.pth")
    with pytest.raises(CheckpointError, match=r"unexpected keys: text_decoder\.bert\.pooler\.dense\.weight"):
        load_model(pth)
    with pytest.warns(UserWarning, match="pooler"):
        load_model(pth, strict=False)


def test_misshaped_key_is_an_error_even_when_not_strict(tmp_path, official_sd):
    key = "text_decoder.bert.encoder.layer.1.crossattention.output.dense.weight"
    official_sd[key] = torch.zeros(64, 32)
    pth = save_official(official_sd, tmp_path / "m.pth")
    for strict in (True, False):
        with pytest.raises(CheckpointError, match=rf"1 mis-shaped.*{key}: checkpoint \(64, 32\) vs model \(64, 64\)"):
            load_model(pth, strict=strict)


def test_tied_alias_must_match(tmp_path, official_sd):
    official_sd["text_decoder.cls.predictions.decoder.bias"] += 1.0
    with pytest.raises(CheckpointError, match="decoder.bias must equal"):
        load_model(save_official(official_sd, tmp_path / "m.pth"))


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "payload": _Exploit(marker)}, path)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_model(path)
    assert not marker.exists()


# -- position embeddings -------------------------------------------------------------------


@pytest.fixture(scope="module")
def caption_sources(official, tmp_path_factory):
    hf_dir, pth, hf_model, _ = official["caption"]
    native = save_model(load_model(hf_dir)[0], BlipTokenizer.default(), tmp_path_factory.mktemp("nat") / "m")
    return {"hf": hf_dir, "official": pth, "openblip": native}, hf_model


@pytest.mark.parametrize("fmt", ["hf", "official", "openblip"])
@torch.no_grad()
def test_image_size_resizes_pos_embed(caption_sources, fmt):
    sources, hf_model = caption_sources
    model, _ = load_model(sources[fmt], image_size=48)
    original = hf_model.vision_model.embeddings.position_embedding  # (1, 1 + 4*4, D)
    width = original.shape[-1]
    grid = original[:, 1:].reshape(1, 4, 4, width).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    expected = torch.cat([original[:, :1], grid.reshape(1, 36, width)], dim=1)
    assert model.cfg.vision.image_size == 48
    assert torch.allclose(model.visual_encoder.pos_embed, expected, atol=1e-6)
    pixels = random_pixel_values(2, 48)
    ours = model.encode_image(pixels)
    assert ours.shape == (2, 37, width)
    # transformers' runtime interpolation is the same bicubic resize.
    theirs = hf_model.vision_model(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state
    assert (ours - theirs).abs().max() < 1e-4


# -- openblip format -------------------------------------------------------------------------


def test_openblip_round_trip_keeps_outputs_and_ties(tmp_path, official):
    model, tokenizer = load_model(official["retrieval"][1], grounded_first_token="cls")
    loaded, loaded_tok = load_model(save_model(model, tokenizer, tmp_path / "ret"))
    assert loaded.cfg == model.cfg and loaded.cfg.grounded_first_token == "cls"
    assert len(loaded_tok) == len(tokenizer)
    _same_state(loaded, model)
    _assert_same_outputs(loaded, model)

    tied = _model_layout("pretrain", tied=True)
    loaded, _ = load_model(save_model(tied, tokenizer, tmp_path / "pre"))
    enc, dec = loaded.text_encoder, loaded.text_decoder
    assert dec.cls.predictions.decoder.weight is dec.bert.embeddings.word_embeddings.weight
    assert enc.embeddings.word_embeddings.weight is dec.bert.embeddings.word_embeddings.weight
    assert enc.encoder.layer[0].attention.self.query.weight is not dec.bert.encoder.layer[0].attention.self.query.weight
    _same_state(loaded, tied)
    _assert_same_outputs(loaded, tied)


class _FailingTokenizer:
    def save_pretrained(self, directory):
        (Path(directory) / "vocab.txt").write_text("half written")
        raise OSError("disk full")


def test_save_is_atomic(tmp_path, official):
    model, tokenizer = load_model(official["caption"][1])
    target = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"):
        save_model(model, _FailingTokenizer(), target)
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temporary directory

    save_model(model, tokenizer, target)
    before = sorted(p.name for p in target.iterdir())
    with pytest.raises(FileExistsError):
        save_model(model, tokenizer, target)
    with pytest.raises(OSError, match="disk full"):
        save_model(model, _FailingTokenizer(), target, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == before and [p.name for p in tmp_path.iterdir()] == ["out"]
    save_model(model, tokenizer, target, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# -- conversion ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_convert_hf_openblip_hf_round_trip(tmp_path, hf_blip, kind):
    hf_dir, hf_model, processor = hf_blip(kind, **({"vision_width": 32} if kind == "vqa" else {}))
    convert(hf_dir, tmp_path / "ob")
    assert detect_format(tmp_path / "ob") == "openblip"
    convert(tmp_path / "ob", tmp_path / "hf", format="hf")
    cls = type(hf_model)
    again, info = cls.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    _same_state(again.eval(), hf_model)
    pixels = random_pixel_values(2, 32, seed=5)
    ids = processor.tokenizer([TEXT, "two cats"], padding=True, return_tensors="pt")
    kwargs = dict(pixel_values=pixels, input_ids=ids["input_ids"], attention_mask=ids["attention_mask"])
    if kind == "vqa":
        kwargs["labels"] = ids["input_ids"]
    first, second = hf_model(**kwargs), again(**kwargs)
    for name in ("logits", "itm_score", "loss"):
        if getattr(first, name, None) is not None:
            assert torch.equal(getattr(first, name), getattr(second, name)), name
    reloaded = transformers.BlipProcessor.from_pretrained(tmp_path / "hf")
    assert reloaded.tokenizer(TEXT)["input_ids"] == processor.tokenizer(TEXT)["input_ids"]
    assert reloaded.tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [30522, 30523]


# -- sources ---------------------------------------------------------------------------------


def test_detect_format(tmp_path, official):
    assert detect_format("Salesforce/blip-image-captioning-base") == "hub"
    with pytest.raises(FileNotFoundError):
        detect_format(tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="neither"):
        detect_format(tmp_path)
    with pytest.raises(ValueError, match="revision"):
        load_model(official["caption"][1], revision="main")


def _fake_hub_cache(cache: Path, repo_id: str, files_from: Path) -> str:
    """The layout huggingface_hub leaves after downloading ``repo_id`` at commit ``abc...``."""
    commit = "a" * 40
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(files_from, repo / "snapshots" / commit)
    return commit


def test_cached_hub_model_needs_no_network(tmp_path, monkeypatch, hf_blip):
    import huggingface_hub.constants

    hf_dir, _, _ = hf_blip("caption")
    commit = _fake_hub_cache(tmp_path / "hub", "openblip-test/tiny-caption", hf_dir)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, _ = load_model("openblip-test/tiny-caption")
    assert model.cfg.extra["source"]["repo_id"] == "openblip-test/tiny-caption"
    assert model.cfg.extra["source"]["commit"] == commit
    with pytest.raises(HubUnavailableError, match="HF_HUB_OFFLINE"):
        load_model("openblip-test/not-cached")


def test_hub_download_picks_one_weight_format(monkeypatch, hf_blip):
    """Online path (simulated): the listing is fetched with a timeout, then only safetensors are downloaded."""
    from huggingface_hub.utils import LocalEntryNotFoundError

    from openblip.checkpoints import hub

    hf_dir, _, _ = hf_blip("caption")
    calls = []

    class FakeApi:
        def model_info(self, repo_id, *, revision, timeout):
            calls.append(("info", repo_id, revision, timeout))
            files = ["config.json", "model.safetensors", "pytorch_model.bin", "tokenizer.json", "README.md"]
            return SimpleNamespace(sha="b" * 40, siblings=[SimpleNamespace(rfilename=f) for f in files])

    def fake_snapshot_download(repo_id, *, revision, allow_patterns, local_files_only=False, etag_timeout=None):
        calls.append(("download", revision, tuple(allow_patterns), local_files_only))
        if local_files_only:
            raise LocalEntryNotFoundError("not cached")
        return str(hf_dir)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "HfApi", FakeApi)
    monkeypatch.setattr(hub, "snapshot_download", fake_snapshot_download)
    model, _ = load_model("openblip-test/tiny-caption", revision="v1")
    assert model.cfg.task == "caption"
    (_, _, _, cached), (_, repo, revision, timeout), (_, sha, patterns, offline) = calls
    assert cached and (repo, revision) == ("openblip-test/tiny-caption", "v1") and 0 < timeout <= 60
    assert sha == "b" * 40 and not offline
    assert "model.safetensors" in patterns and "pytorch_model.bin" not in patterns and "config.json" in patterns


def test_unreachable_hub_fails_within_seconds(tmp_path):
    script = textwrap.dedent(
        """
        import time
        from openblip.checkpoints import HubUnavailableError, load_model
        start = time.monotonic()
        try:
            load_model("openblip-test/made-up-blip")
        except HubUnavailableError as err:
            print(f"{time.monotonic() - start:.2f}")
            print(err)
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env["HF_HOME"] = str(tmp_path)
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    seconds, message = result.stdout.split("\n", 1)
    assert float(seconds) < 15, message
    assert time.monotonic() - started < 60
    assert "openblip-test/made-up-blip" in message and "unreachable" in message
    assert "local directory" in message and "HF_HUB_OFFLINE" in message


def test_tied_pretraining_weights_load_as_a_captioner(tmp_path):
    """Encoder/decoder sharing stores shared tensors once; a decoder-only load still finds them."""
    import torch as _torch

    from openblip import BlipModel, preset
    from openblip.checkpoints import load_model, save_model
    from openblip.tokenizer import BlipTokenizer

    _torch.manual_seed(0)
    model = BlipModel(preset("tiny", tie_encoder_decoder=True)).eval()
    save_model(model, BlipTokenizer.default(), tmp_path / "run")
    captioner, _ = load_model(tmp_path / "run", task="caption")
    assert not hasattr(captioner, "text_encoder")
    ref = model.text_decoder.bert.encoder.layer[0].intermediate.dense.weight
    assert _torch.equal(captioner.text_decoder.bert.encoder.layer[0].intermediate.dense.weight, ref)
    ids = _torch.tensor([[30522, 1037, 3899]])
    image = _torch.randn(1, 3, 64, 64)
    with _torch.no_grad():
        a, _ = model.decode(ids, states=model.encode_image(image))
        b, _ = captioner.decode(ids, states=captioner.encode_image(image))
    assert _torch.allclose(a, b, atol=1e-6)
