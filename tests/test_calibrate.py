"""Choosing the filter's threshold on held-out human pairs (openblip.capfilt.calibrate)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers_data import make_shards

import openblip
from openblip.api import Blip
from openblip.capfilt import calibrate as cal
from openblip.capfilt import calibrate_threshold, load_or_calibrate, score_texts
from openblip.capfilt.bootstrap import BootstrapError, load_bootstrap_config
from openblip.capfilt.noise import NoiseSettings, make_noisy_split
from openblip.cli import main as cli_main
from openblip.data.shards import iter_samples, write_shard
from openblip.tokenizer import BlipTokenizer


@pytest.fixture(scope="module")
def blip() -> Blip:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    return Blip(openblip.BlipModel(openblip.preset("tiny")), BlipTokenizer.default(), device="cpu")


@pytest.fixture
def scripted(monkeypatch):
    """Replace the filter's scores: ITM = SCORES[text], whatever the image."""
    scores: dict[str, float] = {}

    def fake(_blip, pixels, texts_per_image, first_token="enc"):
        assert pixels.shape[0] == len(texts_per_image)
        return [[{"itm": scores[t], "itc": None} for t in texts] for texts in texts_per_image]

    monkeypatch.setattr(cal, "score_texts", fake)
    return scores


def test_threshold_for_keep_keeps_at_least_that_share():
    scores = [0.9, 0.1, 0.5, 0.7, 0.3]
    assert cal.threshold_for_keep(scores, 1.0) == 0.1
    assert cal.threshold_for_keep(scores, 0.8) == 0.3  # 4 of 5 are >= 0.3
    assert cal.threshold_for_keep(scores, 0.5) == 0.5  # ceil(2.5) = 3 kept
    assert cal.threshold_for_keep(scores, 0.01) == 0.9
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="keep"):
            cal.threshold_for_keep(scores, bad)
    with pytest.raises(ValueError, match="no held-out"):
        cal.threshold_for_keep([], 0.9)


def test_calibration_on_scripted_scores(blip, scripted, tmp_path):
    pattern = make_shards(tmp_path / "held", n_shards=2, per_shard=10)
    samples = [s for i in range(2) for s in iter_samples(tmp_path / "held" / f"train-{i:05d}.tar")]
    texts = sorted({s["txt"] for s in samples})
    # Each distinct caption gets its own score, spread over (0, 1).
    scripted.update({t: (i + 1) / (len(texts) + 1) for i, t in enumerate(texts)})
    clean = sorted(scripted[s["txt"]] for s in samples)
    result = calibrate_threshold(blip, pattern, keep=0.75, positive_key="color", batch_size=3)
    assert result["pairs"] == 20
    assert result["threshold"] == clean[20 - 15]  # the 15th highest of 20: 75% kept
    assert result["clean_kept"] == sum(c >= result["threshold"] for c in clean) / 20 >= 0.75
    # Mismatches: one per image, a caption of another colour, never the image's own text.
    assert result["mismatched_pairs"] == 20
    assert 0.0 <= result["mismatched_kept"] <= 1.0
    assert result["positive_key"] == "color" and result["skipped"] == {}


def test_mismatch_partners_skip_same_group_and_same_text():
    items = [("a", "red", 1), ("b", "red", 2), ("c", "blue", 1), ("d", "green", 1)]
    assert cal._mismatch_partners(items) == [None, 2, 1, 1]  # "a": "b" shares its text, "c", "d" its group
    assert cal._mismatch_partners([("a", "x", None), ("b", "x", None)]) == [None, None]


def test_bad_held_out_samples_are_skipped_and_counted(blip, scripted, tmp_path):
    good = make_shards(tmp_path / "good", n_shards=1, per_shard=4)
    extra = [{"__key__": "bad", "png": b"not an image", "txt": "a red square"},
             {"__key__": "notext", "png": b"x"}]
    write_shard(tmp_path / "good" / "train-00001.tar", extra)
    scripted.update({s["txt"]: 0.6 for s in iter_samples(tmp_path / "good" / "train-00000.tar")})
    scripted["a red square"] = 0.6
    result = calibrate_threshold(blip, [good, str(tmp_path / "good" / "train-00001.tar")], keep=0.9)
    assert result["pairs"] == 4 and result["skipped"] == {"bad_image": 1, "no_text": 1}
    assert result["threshold"] == pytest.approx(0.6)
    empty = tmp_path / "empty.tar"
    write_shard(empty, [{"__key__": "notext", "png": b"x"}])
    with pytest.raises(ValueError, match="no usable held-out pair"):
        calibrate_threshold(blip, str(empty))


def test_real_filter_threshold_is_the_quantile_of_its_own_scores(blip, tmp_path):
    pattern = make_shards(tmp_path / "held", n_shards=1, per_shard=10)
    samples = list(iter_samples(tmp_path / "held" / "train-00000.tar"))
    from openblip.images import load_image

    pixels = blip.preprocess([load_image(s["png"]) for s in samples])
    own = sorted((s[0]["itm"] for s in score_texts(blip, pixels, [[s["txt"]] for s in samples])), reverse=True)
    result = calibrate_threshold(blip, pattern, keep=0.8, batch_size=4)
    assert result["threshold"] == pytest.approx(own[7], abs=1e-5)  # 8 of 10 kept


def test_recorded_calibration_is_reused_and_a_changed_one_refused(blip, scripted, tmp_path, monkeypatch):
    pattern = make_shards(tmp_path / "held", n_shards=1, per_shard=6)
    scripted.update({s["txt"]: 0.4 for s in iter_samples(tmp_path / "held" / "train-00000.tar")})
    first = load_or_calibrate(blip, pattern, tmp_path / "out", keep=0.9)
    assert json.loads((tmp_path / "out" / cal.CALIBRATION_FILE).read_text())["threshold"] == first["threshold"]
    monkeypatch.setattr(cal, "calibrate_threshold", lambda *a, **k: pytest.fail("recalibrated on restart"))
    assert load_or_calibrate(blip, pattern, tmp_path / "out", keep=0.9)["threshold"] == first["threshold"]
    with pytest.raises(ValueError, match="keep"):
        load_or_calibrate(blip, pattern, tmp_path / "out", keep=0.5)


def test_noisy_split_holds_out_a_clean_calibration_set(tmp_path):
    source = make_shards(tmp_path / "src", n_shards=2, per_shard=20)
    settings = NoiseSettings(human_size=8, web_size=24, calibration_size=6, fraction=0.5, human_shards=1,
                             web_shards=2)
    stats = make_noisy_split(source, tmp_path / "split", settings)
    calib = list(iter_samples(tmp_path / "split" / "calibration-00000.tar"))
    assert stats["calibration"]["samples"] == 6 and len(calib) == 6
    assert all(s["json"]["subset"] == "calibration" and not s["json"]["noisy"] for s in calib)
    keys = [s["__key__"] for i in range(2) for s in iter_samples(tmp_path / "src" / f"train-{i:05d}.tar")]
    assert [s["__key__"] for s in calib] == keys[32:38]  # the samples right after the web set
    with pytest.raises(ValueError, match="calibration"):
        make_noisy_split(source, tmp_path / "big", NoiseSettings(human_size=8, web_size=30, calibration_size=6))


def test_cli_calibrates_then_filters_with_that_threshold(blip, tmp_path, capsys):
    model_dir = tmp_path / "model"
    from openblip.checkpoints import save_model

    save_model(blip.model, blip.tokenizer, model_dir)
    web = make_shards(tmp_path / "web", n_shards=1, per_shard=6, seed=3)
    held = make_shards(tmp_path / "held", n_shards=1, per_shard=8, seed=4)
    out = tmp_path / "out"
    args = ["capfilt", "--num-captions", "0", "--filter", str(model_dir), "--input", web, "--output", str(out),
            "--calibrate", held, "--keep", "0.5", "--no-progress", "--batch-size", "4"]
    assert cli_main(args) == 0
    calibration = json.loads((out / "calibration.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["threshold"] == calibration["threshold"]
    assert "calibrated threshold" in capsys.readouterr().out
    decisions = [json.loads(line) for line in (out / "train-00000.decisions.jsonl").read_text().splitlines()]
    assert [d["kept"] for d in decisions] == [d["itm"] >= calibration["threshold"] for d in decisions]
    assert cli_main([*args, "--threshold", "0.3"]) == 2
    assert "not both" in capsys.readouterr().err


def _config(**overrides):
    # capfilt.threshold=None: the smoke preset's fixed threshold switched off.
    return load_bootstrap_config("tiny-test", {"data.noisy_split.source": "x.tar", "capfilt.threshold": None,
                                               "evaluate": None,
                                               **overrides})


def test_bootstrap_config_checks_the_calibration_section():
    _config(**{"capfilt.calibrate": {"keep": 0.9}, "data.noisy_split.calibration_size": 4})
    with pytest.raises(BootstrapError, match="held-out"):
        _config(**{"capfilt.calibrate": {"keep": 0.9}})
    with pytest.raises(BootstrapError, match="calibrate"):
        _config(**{"capfilt.calibrate": {"kep": 0.9}, "data.noisy_split.calibration_size": 4})
    with pytest.raises(BootstrapError, match="keep"):
        _config(**{"capfilt.calibrate": {"keep": 1.5}, "data.noisy_split.calibration_size": 4})
    with pytest.raises(BootstrapError, match="not both"):
        _config(**{"capfilt.calibrate": {"keep": 0.9}, "data.noisy_split.calibration_size": 4,
                   "capfilt.threshold": 0.5})
