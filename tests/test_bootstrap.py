"""Controlled caption noise, CapFilt precision/recall, and the whole bootstrap loop on tiny shards."""

from __future__ import annotations

import io
import json
import runpy
import shutil
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch
from helpers_data import make_shards, shape_image

from openblip.capfilt.bootstrap import MARKER, STAGES
from openblip.capfilt.noise import NoiseSettings, make_noisy_split
from openblip.cli import main as cli_main
from openblip.data.shards import expand_urls, iter_samples, write_shard
from openblip.text import pre_caption

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def samples(pattern: str) -> list[dict]:
    return [s for group in expand_urls(pattern) for path in group for s in iter_samples(path)]


def run_script(name: str, *args: str) -> str:
    out, argv = io.StringIO(), sys.argv
    sys.argv = [name, *args]
    try:
        with redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(SCRIPTS / name), run_name="__main__")
    finally:
        sys.argv = argv
    assert exit_info.value.code == 0, out.getvalue()
    return out.getvalue()


# -- the noisy split ------------------------------------------------------------------------------


@pytest.mark.parametrize("class_key", [None, "color"])
def test_noisy_split_swaps_exactly_the_fraction_for_a_different_caption(tmp_path, class_key):
    source = make_shards(tmp_path / "src", n_shards=2, per_shard=20)
    settings = NoiseSettings(human_size=8, fraction=0.3, class_key=class_key, human_shards=1, web_shards=3)
    stats = make_noisy_split(source, tmp_path / "a", settings)
    human, web = samples(stats["human"]["pattern"]), samples(stats["web"]["pattern"])
    assert len(human) == 8 and len(web) == 32 and stats["web"]["shards"] == 3
    assert all(not s["json"]["noisy"] and s["txt"] == s["json"]["original_caption"] for s in human)
    swapped = [s for s in web if s["json"]["noisy"]]
    assert len(swapped) == stats["web"]["swapped"] == round(0.3 * 32)
    by_key = {s["__key__"]: s for s in web}
    for s in swapped:
        assert pre_caption(s["txt"]) != pre_caption(s["json"]["original_caption"])
        donor = by_key[s["json"]["swapped_from"]]
        assert s["txt"] == donor["json"]["original_caption"]
        if class_key:
            assert donor["json"]["color"] != s["json"]["color"]
    assert all(s["txt"] == s["json"]["original_caption"] for s in web if not s["json"]["noisy"])
    # Same input and seed: the same bytes; another seed: other swaps.
    again = make_noisy_split(source, tmp_path / "b", settings)
    for a, b in zip(sorted((tmp_path / "a").glob("*.tar")), sorted((tmp_path / "b").glob("*.tar"))):
        assert a.read_bytes() == b.read_bytes()
    assert again["web"]["swapped"] == stats["web"]["swapped"]
    other = make_noisy_split(source, tmp_path / "c", NoiseSettings(**{**settings.__dict__, "seed": 1}))
    assert {s["__key__"] for s in samples(other["web"]["pattern"]) if s["json"]["noisy"]} != set(
        s["__key__"] for s in swapped)
    with pytest.raises(FileExistsError):
        make_noisy_split(source, tmp_path / "a", settings)


# -- precision / recall ---------------------------------------------------------------------------


def test_precision_recall_script_on_a_hand_made_manifest(tmp_path):
    # 4 swapped captions (3 removed), 6 clean ones (1 removed), 10 synthetic (7 kept).
    noisy = {f"k{i}": i < 4 for i in range(10)}
    removed = {"k0", "k1", "k2", "k5"}
    buffer = io.BytesIO()
    shape_image("red", "square").save(buffer, "PNG")
    write_shard(tmp_path / "web-00000.tar", [{"__key__": k, "png": buffer.getvalue(), "txt": "a red square",
                                              "json": {"noisy": flag}} for k, flag in noisy.items()])
    rows = [{"shard": "web-00000", "key": k, "source": "web", "text": "t", "itm": 0.5, "itc": 0.1,
             "kept": k not in removed} for k in noisy]
    rows += [{"shard": "web-00000", "key": f"k{i}", "source": "synthetic", "text": "s", "itm": 0.5, "itc": 0.1,
              "kept": i < 7} for i in range(10)]
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = run_script("capfilt_precision_recall.py", str(tmp_path / "manifest.jsonl"))
    *body, row = out.strip().splitlines()
    result = json.loads("\n".join(body))
    assert (result["tp"], result["fp"], result["fn"], result["tn"]) == (3, 1, 1, 5)
    assert result["precision"] == pytest.approx(0.75) and result["recall"] == pytest.approx(0.75)
    assert result["kept"] == pytest.approx({"web": 0.6, "web_clean": 5 / 6, "web_swapped": 0.25, "synthetic": 0.7})
    assert row == result["markdown"] == "| 40.0% | 0.750 | 0.750 | 0.750 | 60.0% | 83.3% | 25.0% | 70.0% |"
    # An output directory without a manifest: per-shard decisions; flags from another place.
    folder = tmp_path / "capfilt"
    folder.mkdir()
    (folder / "web-00000.decisions.jsonl").write_text((tmp_path / "manifest.jsonl").read_text())
    out = run_script("capfilt_precision_recall.py", str(folder), "--flags", str(tmp_path / "web-00000.tar"))
    assert json.loads("\n".join(out.strip().splitlines()[:-1]))["tp"] == 3
    # Re-deciding at other thresholds from the recorded scores: swapped k0-k3 score 0.1-0.4, clean 0.35-0.85.
    scores = {f"k{i}": 0.1 * (i + 1) if i < 4 else 0.1 * i - 0.05 for i in range(10)}
    (tmp_path / "manifest.jsonl").write_text("".join(
        json.dumps({**r, "itm": scores[r["key"]], "itc": -scores[r["key"]]}) + "\n" for r in rows))
    lines = run_script("capfilt_precision_recall.py", str(tmp_path / "manifest.jsonl"),
                       "--thresholds", "0.3,0.5").strip().splitlines()
    # itm: clean 0.35 < swapped 0.4 is the one inverted pair of 24; itc is the reverse order
    assert json.loads(lines[-3]) == {"auc": {"itm": round(23 / 24, 4), "itc": round(1 / 24, 4)}}
    # at 0.3: k0-k1 removed (tp 2), none clean; at 0.5: k0-k3 and k4 (0.35), k5 (0.45) removed
    assert lines[-2].startswith("| 0.3 | 40.0% | 1.000 | 0.500 |")
    assert lines[-1].startswith("| 0.5 | 40.0% | 0.667 | 1.000 |")


def test_make_noisy_split_script(tmp_path):
    source = make_shards(tmp_path / "src", n_shards=1, per_shard=12)
    out = run_script("make_noisy_split.py", source, str(tmp_path / "out"), "--human-size", "2", "--fraction", "0.5",
                     "--web-shards", "2", "--calibration-size", "2")
    assert json.loads(out)["web"] == {"samples": 8, "swapped": 4, "fraction": 0.5, "shards": 2,
                                      "pattern": str(tmp_path / "out" / "web-{00000..00001}.tar")}
    assert json.loads(out)["calibration"]["samples"] == 2


def test_capfilt_throughput_setup_writes_loadable_models_and_split_inputs(tmp_path):
    source = make_shards(tmp_path / "src", n_shards=1, per_shard=10)
    out = json.loads(run_script("capfilt_throughput_setup.py", "--source", source, "--images", "8", "--out",
                                str(tmp_path / "tp")))
    assert [len(samples(str(p))) for p in sorted((tmp_path / "tp" / "input").glob("*.tar"))] == [2, 2, 2, 2]
    from openblip.api import Blip

    assert Blip.from_pretrained(out["captioner"], device="cpu").config.task == "caption"
    assert Blip.from_pretrained(out["filter"], device="cpu").config.task == "retrieval"


# -- the loop ---------------------------------------------------------------------------------------


def test_bootstrap_runs_every_stage_then_continues_instead_of_redoing(tmp_path, capsys):
    source = make_shards(tmp_path / "src", n_shards=2, per_shard=12)
    held_out = make_shards(tmp_path / "test", n_shards=1, per_shard=8, seed=1)
    out = tmp_path / "run"
    args = ["bootstrap", "--config", "tiny-test", "--output", str(out), "--no-progress",
            "--set", f"data.noisy_split.source={source}", "--set", f"evaluate.data={held_out}",
            "--set", "evaluate.label_key=color"]
    assert cli_main(args) == 0
    for stage in STAGES:
        assert (out / stage / MARKER).is_file(), stage
    report = json.loads((out / "report.json").read_text())
    assert report["complete"] and set(report["stages"]) == set(STAGES)
    boot = report["stages"]["pretrain-bootstrapped"]["result"]
    assert boot["train_data"] == f"{out}/capfilt/*.tar::{out}/noisy-split/human-*.tar" and boot["weights"] == "16::8"
    assert report["noise"]["swapped"] == 5 and report["noise"]["swapped"] + report["noise"]["clean"] == 16
    for name in ("noisy", "bootstrapped"):
        result = report["stages"]["evaluate"]["result"][name]
        assert set(result["retrieval"]) >= {"txt_r1", "img_r1", "r_mean", "class_txt_r1", "class_img_r1"}
        assert "CIDEr" in result["caption"]
        assert len(json.loads((out / "evaluate" / f"{name}-captions.json").read_text())) == 8
    assert "| noisy |" in report["comparison"]["markdown"]
    # The same command again: every stage is skipped, nothing is rewritten.
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "report.json"}
    capsys.readouterr()
    assert cli_main([*args, "--resume"]) == 0
    assert capsys.readouterr().err.count("complete, skipped") == len(STAGES)
    assert stamps == {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "report.json"}


def test_bootstrap_resumes_a_killed_stage_and_refuses_changed_settings(tmp_path, capsys):
    source = make_shards(tmp_path / "src", n_shards=2, per_shard=12)
    out = tmp_path / "run"
    args = ["bootstrap", "--config", "tiny-test", "--output", str(out), "--no-progress",
            "--set", f"data.noisy_split.source={source}", "--set", "evaluate=null"]
    assert cli_main([*args, "--resume"]) == 2  # nothing to resume yet
    assert "no earlier bootstrap run" in capsys.readouterr().err
    assert cli_main([*args, "--until", "captioner"]) == 0
    assert (out / "captioner" / MARKER).is_file() and not (out / "filter").exists()
    # As if killed after the checkpoint of step 2 of 3: the stage continues from it.
    shutil.rmtree(out / "pretrain" / "checkpoints" / "step-00000003")
    (out / "captioner" / MARKER).unlink()
    (out / "pretrain" / MARKER).unlink()
    assert cli_main([*args, "--until", "filter"]) == 0
    log = [json.loads(line) for line in (out / "pretrain" / "log.jsonl").read_text().splitlines()]
    assert any(r.get("event") == "resume" and r["step"] == 2 for r in log)
    assert (out / "filter" / MARKER).is_file() and not (out / "capfilt").exists()
    assert not json.loads((out / "report.json").read_text())["complete"]
    # A different recipe for a finished stage is refused before any work.
    assert cli_main([*args, "--set", "pretrain.max_steps=4"]) == 2
    err = capsys.readouterr().err
    assert "pretrain was started with other settings (train changed)" in err
    # Settings recorded before a training field existed still match when it keeps its default.
    marker = out / "pretrain" / MARKER
    record = json.loads(marker.read_text())
    del record["settings"]["own"]["train"]["positive_key"]
    marker.write_text(json.dumps(record))
    capsys.readouterr()
    assert cli_main([*args, "--until", "filter"]) == 0
    assert "pretrain: complete, skipped" in capsys.readouterr().err


def test_bootstrap_capfilt_with_a_calibrated_threshold(tmp_path):
    source = make_shards(tmp_path / "src", n_shards=2, per_shard=14)
    out = tmp_path / "run"
    args = ["bootstrap", "--config", "tiny-test", "--output", str(out), "--no-progress", "--until", "capfilt",
            "--set", f"data.noisy_split.source={source}", "--set", "evaluate=null",
            "--set", "data.noisy_split.calibration_size=6", "--set", "data.noisy_split.web_size=14",
            "--set", "capfilt.threshold=null", "--set", 'capfilt.calibrate={"keep": 0.5}']
    assert cli_main(args) == 0
    assert len(samples(str(out / "noisy-split" / "calibration-*.tar"))) == 6
    calibration = json.loads((out / "capfilt" / "calibration.json").read_text())
    assert calibration["pairs"] == 6 and calibration["clean_kept"] >= 0.5
    result = json.loads((out / "capfilt" / MARKER).read_text())["result"]
    assert result["calibration"]["threshold"] == calibration["threshold"]
    decisions = [json.loads(line) for line in (out / "capfilt" / "manifest.jsonl").read_text().splitlines()]
    assert len(decisions) == 28 and [d["kept"] for d in decisions] == [
        d["itm"] >= calibration["threshold"] for d in decisions]
