"""Real photos through caption, match and vqa, from Python and the command line, with bad files."""

import json
import os
import shutil

import pytest
import torch
from PIL import Image

import openblip
from openblip import BlipModel, preset
from openblip.checkpoints import save_model
from openblip.cli import main
from openblip.tokenizer import BlipTokenizer

skdata = pytest.importorskip("skimage.data")
PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png"]


def _spread(model: BlipModel) -> BlipModel:
    """Decisive random weights, so that decoding is not a string of near-ties."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 1.5 / p.shape[1] ** 0.5)
    return model


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    root = os.path.dirname(skdata.__file__)
    for name in PHOTOS:
        shutil.copy(os.path.join(root, name), folder / name)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("models")
    tok = BlipTokenizer.default()
    save_model(_spread(BlipModel(preset("tiny"))), tok, root / "pretrain")
    vqa_cfg = preset("tiny", task="vqa", decoder_cross="question", has_itc=False, has_itm=False)
    save_model(_spread(BlipModel(vqa_cfg)), tok, root / "vqa")
    return root


def _bad_files(folder):
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.png").write_text("this is not an image")
    data = (folder / "coffee.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 3])
    return ["empty.jpg", "notes.png", "truncated.png"]


def _jsonl(capsys):
    out = capsys.readouterr()
    return [json.loads(line) for line in out.out.splitlines() if line.strip()], out.err


def test_caption_cli_on_real_photos(photos, models, capsys):
    code = main(["caption", str(photos), "--model", str(models / "pretrain"), "--format", "jsonl",
                 "--max-length", "8", "--num-beams", "2", "--batch-size", "2", "--no-progress"])
    records, _ = _jsonl(capsys)
    assert code == 0
    assert sorted(os.path.basename(r["image"]) for r in records) == sorted(PHOTOS)
    assert all(isinstance(r["caption"], str) and r["caption"] for r in records)


def test_bad_files_are_reported_and_the_rest_finishes(photos, models, tmp_path, capsys):
    folder = tmp_path / "mixed"
    shutil.copytree(photos, folder)
    bad = _bad_files(folder)
    code = main(["caption", str(folder), str(tmp_path / "missing.jpg"), "--model", str(models / "pretrain"),
                 "--format", "jsonl", "--max-length", "6", "--batch-size", "3", "--no-progress"])
    records, err = _jsonl(capsys)
    assert code == 1
    good = {os.path.basename(r["image"]) for r in records if "caption" in r}
    failed = {os.path.basename(r["image"]) for r in records if "error" in r}
    assert good == set(PHOTOS)
    assert failed == set(bad) | {"missing.jpg"}
    for name in bad + ["missing.jpg"]:
        assert name in err  # every message names its file


def test_batching_does_not_change_captions(photos, models):
    blip = openblip.load(models / "pretrain")
    images = [Image.open(photos / name) for name in PHOTOS]
    batched = blip.caption(images, num_beams=3, max_length=10, batch_size=5)
    single = [blip.caption(im, num_beams=3, max_length=10) for im in images]
    assert batched == single
    greedy = blip.caption(images, num_beams=1, max_length=10, batch_size=2)
    assert greedy == [blip.caption(im, num_beams=1, max_length=10) for im in images]


def test_sampling_is_seeded_and_returns_several_captions(photos, models):
    blip = openblip.load(models / "pretrain")
    a = blip.caption(photos / "chelsea.png", sample=True, num_captions=3, seed=1, max_length=10)
    b = blip.caption(photos / "chelsea.png", sample=True, num_captions=3, seed=1, max_length=10)
    assert a == b and len(a) == 3 and len(set(a)) > 1


def test_match_cli_scores_every_text(photos, models, capsys):
    texts = ["a cat", "an astronaut in a suit", "a cup of coffee"]
    code = main(["match", str(photos / "chelsea.png"), *texts, "--model", str(models / "pretrain"),
                 "--format", "jsonl"])
    records, _ = _jsonl(capsys)
    assert code == 0 and [r["text"] for r in records] == texts
    assert all(0.0 <= r["itm"] <= 1.0 and -1.0 <= r["itc"] <= 1.0 for r in records)
    # The CLI and the Python API agree, and ITC is the cosine of the two embeddings.
    blip = openblip.load(models / "pretrain")
    scores = blip.match(photos / "chelsea.png", texts)
    assert [r["itm"] for r in records] == pytest.approx(scores.itm[0].tolist(), abs=1e-5)
    cos = blip.embed_images(photos / "chelsea.png") @ blip.embed_texts(texts).T
    assert scores.itc[0].tolist() == pytest.approx(cos.tolist(), abs=1e-5)


def test_match_reuses_image_keys_for_all_texts_and_equals_pairwise(photos, models):
    blip = openblip.load(models / "pretrain")
    texts = ["a cat", "a rocket on a launch pad", "a man on a motorbike", "coffee"]
    scores = blip.match([photos / "rocket.jpg", photos / "astronaut.png"], texts)
    for i, name in enumerate(["rocket.jpg", "astronaut.png"]):
        for j, text in enumerate(texts):
            one = blip.match(photos / name, text)
            assert float(one.itm[0, 0]) == pytest.approx(float(scores.itm[i, j]), abs=1e-5)


def test_vqa_cli_generates_and_ranks(photos, models, tmp_path, capsys):
    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps(["yes", "no", "two", "a cat", "blue"]))
    code = main(["vqa", str(photos / "chelsea.png"), "what animal is this?", "--model", str(models / "vqa"),
                 "--answers", str(answers), "--format", "jsonl"])
    records, _ = _jsonl(capsys)
    assert code == 0 and records[0]["answer"] in json.loads(answers.read_text())
    code = main(["vqa", str(photos), "what is in the picture?", "--model", str(models / "vqa"), "--format", "jsonl",
                 "--no-progress"])
    records, _ = _jsonl(capsys)
    assert code == 0 and len(records) == len(PHOTOS)
    assert all(isinstance(r["answer"], str) for r in records)


def test_vqa_ranking_agrees_with_scoring_every_answer(photos, models):
    """Rank mode keeps the top-k by first token; with k = all answers it is an exhaustive argmin."""
    blip = openblip.load(models / "vqa")
    answers = ["yes", "no", "two", "a cat", "blue sky"]
    full = blip.answer(photos / "chelsea.png", "what is it", answers=answers, k=len(answers))
    model, tok = blip.model, blip.tokenizer
    with torch.no_grad():
        image = model.encode_image(blip.preprocess([photos / "chelsea.png"]))
        q = tok(["what is it"], first_token="enc")
        states = model.encode_grounded(q["input_ids"], q["attention_mask"], image_embeds=image)
        a = tok(answers, first_token="dec")
        logits, _ = model.decode(a["input_ids"], a["attention_mask"], states=states.expand(len(answers), -1, -1))
        from openblip.models.vqa import sequence_loss

        losses = sequence_loss(logits, a["input_ids"], a["attention_mask"], 0.1)
    assert full == answers[int(losses.argmin())]


def test_wrong_task_gives_a_clear_error(photos, models):
    blip = openblip.load(models / "vqa")
    with pytest.raises(ValueError, match="VQA model"):
        blip.caption(photos / "chelsea.png")
    with pytest.raises(openblip.models.blip.MissingPartError, match="ITM"):
        blip.match(photos / "chelsea.png", "a cat")


def test_bad_decoding_and_vqa_arguments_are_refused(photos, models, capsys):
    blip, vqa = openblip.load(models / "pretrain"), openblip.load(models / "vqa")
    with pytest.raises(ValueError, match="num_beams must be at least 1, got 0"):
        blip.caption(photos / "chelsea.png", num_beams=0)
    with pytest.raises(ValueError, match="the question is empty once cleaned"):
        vqa.answer(photos / "chelsea.png", " !.; ")
    with pytest.raises(ValueError, match="question 1 is empty"):
        vqa.answer([photos / "chelsea.png"] * 2, ["what is it?", ""], clean_question=False)
    with pytest.raises(ValueError, match="k .* at least 1"):
        vqa.answer(photos / "chelsea.png", "what is it?", answers=["cat"], k=0)
    assert main(["vqa", str(photos / "chelsea.png"), "", "--model", str(models / "vqa")]) == 2
    assert "the question is empty" in capsys.readouterr().err


def test_unloadable_model_is_a_usage_error(tmp_path, photos, capsys):
    code = main(["caption", str(photos / "chelsea.png"), "--model", str(tmp_path / "nowhere")])
    assert code == 2
    assert "cannot load model" in capsys.readouterr().err


def test_seeded_sampling_does_not_depend_on_batch_size(photos, models):
    blip = openblip.load(models / "pretrain")
    images = [photos / name for name in PHOTOS]
    one = blip.caption(images, sample=True, seed=3, max_length=10, batch_size=1)
    all_ = blip.caption(images, sample=True, seed=3, max_length=10, batch_size=5)
    assert one == all_
