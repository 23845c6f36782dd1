"""CapFilt: filter decisions, shard-in/shard-out output, determinism, ranks, crash-safe restarts."""

from __future__ import annotations

import copy
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers_data import make_shards, shape_image

import openblip
from openblip.api import Blip
from openblip.capfilt import decide, run_capfilt, sample_captions, sample_seed, sampling_settings, score_texts
from openblip.capfilt import run as capfilt_run
from openblip.cli import main as cli_main
from openblip.data.shards import iter_samples, write_shard
from openblip.tokenizer import BlipTokenizer

FAST = {"max_length": 10, "min_length": 4, "batch_size": 4, "progress": False}


@pytest.fixture(scope="module")
def blip() -> Blip:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    return Blip(openblip.BlipModel(openblip.preset("tiny")), BlipTokenizer.default(), device="cpu")


def forced_filter(blip: Blip, logits: tuple[float, float]) -> Blip:
    """A copy of `blip` whose ITM head outputs `logits` for every pair."""
    model = copy.deepcopy(blip.model)
    with torch.no_grad():
        model.itm_head.weight.zero_()
        model.itm_head.bias.copy_(torch.tensor(logits))
    return Blip(model, blip.tokenizer, device="cpu")


def png(color: str = "red", shape: str = "square") -> bytes:
    buffer = io.BytesIO()
    shape_image(color, shape).save(buffer, "PNG")
    return buffer.getvalue()


def read_dir(folder: Path) -> dict[str, list[dict]]:
    return {p.name: list(iter_samples(p)) for p in sorted(folder.glob("*.tar"))}


def decisions(folder: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (folder / f"{name}.decisions.jsonl").read_text().splitlines()]


def identity(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


# -- the filter ------------------------------------------------------------------------------


def test_decide_keeps_ties_and_checks_threshold():
    assert decide(0.5) and decide(0.5, 0.5) and decide(1.0, 1.0) and decide(0.0, 0.0)
    assert not decide(0.4999999) and not decide(0.69, 0.7)
    with pytest.raises(ValueError):
        decide(0.5, 1.5)


def test_score_texts_matches_blip_match_per_image(blip):
    images = [shape_image("red", "square"), shape_image("blue", "circle")]
    texts = [["a red square", "a blue circle", "a dog"], ["a blue circle"]]
    scores = score_texts(blip, blip.preprocess(images), texts)
    for i, image in enumerate(images):
        ref = blip.match([image], texts[i], first_token="enc")
        assert [s["itm"] for s in scores[i]] == pytest.approx(ref.itm[0].tolist(), abs=1e-5)
        assert [s["itc"] for s in scores[i]] == pytest.approx(ref.itc[0].tolist(), abs=1e-5)
    assert score_texts(blip, blip.preprocess(images), [[], []]) == [[], []]


def test_forced_itm_scores_and_threshold_edge(blip, tmp_path):
    # Zero weights, equal biases: softmax gives exactly 0.5 for every pair.
    half = forced_filter(blip, (0.0, 0.0))
    scores = score_texts(half, blip.preprocess([shape_image("red", "square")]), [["a red square", "x"]])
    assert [s["itm"] for s in scores[0]] == [0.5, 0.5]
    pattern = make_shards(tmp_path / "in", n_shards=1, per_shard=3)
    at = run_capfilt(blip, half, pattern, tmp_path / "at", threshold=0.5, **FAST)
    above = run_capfilt(blip, half, pattern, tmp_path / "above", threshold=0.5000001, **FAST)
    assert at["kept"]["all"] == {"scored": 6, "kept": 6, "fraction": 1.0}
    assert above["kept"]["all"] == {"scored": 6, "kept": 0, "fraction": 0.0}
    p = torch.tensor([-2.0, 1.0]).softmax(0)[1].item()
    scores = score_texts(forced_filter(blip, (-2.0, 1.0)), blip.preprocess([shape_image("red", "square")]), [["a"]])
    assert scores[0][0]["itm"] == pytest.approx(p, abs=1e-6)


# -- the captioner ---------------------------------------------------------------------------


def test_sampling_does_not_depend_on_batching(blip):
    prompt_ids, gen = sampling_settings(blip, num_captions=2, max_length=10, min_length=4)
    pixels = blip.preprocess([shape_image(c, "circle") for c in ("red", "green", "blue")])
    seeds = [sample_seed(0, k) for k in ("a", "b", "c")]
    together = sample_captions(blip, pixels, seeds, prompt_ids, gen)
    alone = [sample_captions(blip, pixels[i : i + 1], seeds[i : i + 1], prompt_ids, gen)[0] for i in range(3)]
    assert together == alone
    assert all(len(c) == 2 for c in together)
    assert sample_captions(blip, pixels, [sample_seed(1, k) for k in "abc"], prompt_ids, gen) != together


# -- runs over shards ------------------------------------------------------------------------


def test_output_format_manifest_and_summary(blip, tmp_path, monkeypatch):
    # Hand-set scores: web text kept, first synthetic dropped, second kept at the threshold.
    def fake_scores(filter_blip, pixels, texts_per_image, first_token="enc"):
        hand = [0.9, 0.1, 0.5]
        return [[{"itm": hand[j], "itc": 0.25} for j in range(len(ts))] for ts in texts_per_image]

    monkeypatch.setattr(capfilt_run, "score_texts", fake_scores)
    pattern = make_shards(tmp_path / "in", n_shards=2, per_shard=3)
    out = tmp_path / "out"
    summary = run_capfilt(blip, blip, pattern, out, num_captions=2, manifest_format="jsonl", **FAST)

    inputs = read_dir(tmp_path / "in")
    outputs = read_dir(out)
    assert sorted(outputs) == sorted(inputs) == ["train-00000.tar", "train-00001.tar"]
    for name, samples in inputs.items():
        got = {s["__key__"]: s for s in outputs[name]}
        assert [s["__key__"] for s in outputs[name]] == [s["__key__"] for s in samples]
        rows = decisions(out, name[:-4])
        assert len(rows) == 3 * len(samples)
        for sample in samples:
            o = got[sample["__key__"]]
            assert o["png"] == sample["png"]
            meta = o["json"]
            assert {k: meta[k] for k in sample["json"]} == sample["json"]
            assert meta["web_text"] == sample["txt"] and meta["web_itm"] == 0.9 and meta["web_kept"] is True
            assert [(s["itm"], s["kept"]) for s in meta["synthetic"]] == [(0.1, False), (0.5, True)]
            assert o["txt"].split("\n") == [sample["txt"], meta["synthetic"][1]["text"]]
            mine = [r for r in rows if r["key"] == sample["__key__"]]
            assert [(r["source"], r["text"], r["kept"]) for r in mine] == [
                ("web", sample["txt"], True),
                *[("synthetic", s["text"], s["kept"]) for s in meta["synthetic"]],
            ]

    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == 18 and {r["shard"] for r in manifest} == {"train-00000", "train-00001"}
    on_disk = json.loads((out / "summary.json").read_text())
    assert summary["summary_path"] == str(out / "summary.json") and on_disk["samples"] == summary["samples"] == 6
    assert summary["kept"]["web"] == {"scored": 6, "kept": 6, "fraction": 1.0}
    assert summary["kept"]["synthetic"] == {"scored": 12, "kept": 6, "fraction": 0.5}
    assert summary["kept"]["all"]["kept"] == sum(r["kept"] for r in manifest) == 12
    assert summary["shards"] == {"total": 2, "finished": 2, "missing": []}
    assert summary["throughput"]["images"] == 6 and summary["throughput"]["images_per_s"] > 0
    assert summary["settings"]["top_k"] == 50 and summary["settings"]["threshold"] == 0.5


def test_bad_image_and_missing_text_are_written_once(blip, tmp_path):
    write_shard(tmp_path / "in" / "web-00000.tar", [
        {"__key__": "k0", "jpg": b"not a jpeg at all", "txt": "a broken image", "json": {"url": "u0"}},
        {"__key__": "k1", "png": png("green", "circle")},  # no web text: synthetic only
        {"__key__": "k2", "txt": "no image member"},
        {"__key__": "k3", "png": png(), "txt": "A Red Square!", "json": {"url": "u3"}},
    ])
    summary = run_capfilt(blip, blip, str(tmp_path / "in"), tmp_path / "out", **FAST)
    out = {s["__key__"]: s for s in iter_samples(tmp_path / "out" / "web-00000.tar")}
    assert sorted(out) == ["k0", "k1", "k2", "k3"]
    assert out["k0"]["jpg"] == b"not a jpeg at all" and "cannot decode .jpg" in out["k0"]["json"]["error"]
    assert out["k0"]["json"]["web_text"] == "a broken image" and out["k0"]["json"]["synthetic"] == []
    assert out["k0"]["txt"] == "" and out["k2"]["txt"] == "" and "no image member" in out["k2"]["json"]["error"]
    assert out["k1"]["json"]["web_text"] is None and out["k1"]["json"]["web_itm"] is None
    assert len(out["k1"]["json"]["synthetic"]) == 1 and "error" not in out["k1"]["json"]
    assert out["k3"]["json"]["web_text"] == "A Red Square!"  # raw in json, cleaned where scored
    assert [r["text"] for r in decisions(tmp_path / "out", "web-00000") if r["source"] == "web"] == ["a red square"]
    assert summary["image_errors"] == 2 and summary["samples"] == 4 and summary["samples_without_web_text"] == 1
    assert summary["kept"]["web"]["scored"] == 1 and summary["kept"]["synthetic"]["scored"] == 2


def test_filter_only_scores_web_texts_without_a_captioner(blip, tmp_path):
    # Keep texts only where the hand-set logits favour "match": one filter keeps all, one none.
    write_shard(tmp_path / "in" / "web-00000.tar", [
        {"__key__": "k0", "png": png(), "txt": "A red square"},
        {"__key__": "k1", "png": png("green", "circle")},  # nothing to score without a captioner
        {"__key__": "k2", "jpg": b"broken", "txt": "a broken image"},
    ])
    kept = run_capfilt(None, forced_filter(blip, (-3.0, 3.0)), str(tmp_path / "in"), tmp_path / "keep",
                       num_captions=0, **FAST)
    out = {s["__key__"]: s for s in iter_samples(tmp_path / "keep" / "web-00000.tar")}
    assert out["k0"]["txt"] == "a red square" and out["k0"]["json"]["web_kept"] is True
    assert out["k0"]["json"]["synthetic"] == [] and out["k1"]["json"]["synthetic"] == [] and out["k1"]["txt"] == ""
    assert "cannot decode" in out["k2"]["json"]["error"]
    assert kept["kept"]["web"] == {"scored": 1, "kept": 1, "fraction": 1.0}
    assert kept["kept"]["synthetic"]["scored"] == 0 and kept["settings"]["captioner"] is None
    dropped = run_capfilt(blip, forced_filter(blip, (3.0, -3.0)), str(tmp_path / "in"), tmp_path / "drop",
                          num_captions=0, **FAST)  # a captioner given is not used
    assert dropped["kept"]["web"] == {"scored": 1, "kept": 0, "fraction": 0.0}
    assert dropped["kept"]["synthetic"]["scored"] == 0
    with pytest.raises(ValueError, match="needs a captioner"):
        run_capfilt(None, blip, str(tmp_path / "in"), tmp_path / "x", num_captions=1, **FAST)
    with pytest.raises(ValueError, match="num_captions must be 0"):
        run_capfilt(blip, blip, str(tmp_path / "in"), tmp_path / "y", num_captions=-1, **FAST)


def test_two_ranks_cover_every_shard_once(blip, tmp_path):
    pattern = make_shards(tmp_path / "in", n_shards=3, per_shard=2)
    out = tmp_path / "out"
    # In one process: rank 1 first, so rank 0's summary (written after its no-op barrier) sees all.
    report = run_capfilt(blip, blip, pattern, out, rank=1, world_size=2, **FAST)
    assert report["shards_processed"] == 1 and not (out / "summary.json").exists()
    summary = run_capfilt(blip, blip, pattern, out, rank=0, world_size=2, **FAST)
    ranks = {n: json.loads((out / f"train-0000{n}.stats.json").read_text())["rank"] for n in range(3)}
    assert ranks == {0: 0, 1: 1, 2: 0}
    assert summary["shards"]["finished"] == 3 and summary["samples"] == 6
    assert summary["throughput"]["processes"] == 2 and summary["throughput"]["shards_processed"] == 3
    keys = [s["__key__"] for samples in read_dir(out).values() for s in samples]
    assert sorted(keys) == sorted(s["__key__"] for samples in read_dir(tmp_path / "in").values() for s in samples)


def test_restart_skips_finished_and_redoes_partial_shards(blip, tmp_path):
    pattern = make_shards(tmp_path / "in", n_shards=2, per_shard=3)
    out = tmp_path / "out"
    run_capfilt(blip, blip, pattern, out, workers=2, **FAST)  # decoding threads ahead of the models
    first = identity(out / "train-00000.tar")
    before = decisions(out, "train-00001")
    # As if killed after the decisions were written but before the tar was renamed into place.
    (out / "train-00001.tar").unlink()
    (out / ".train-00001.tar.x1y2.tmp").write_bytes(b"partial")
    summary = run_capfilt(blip, blip, pattern, out, batch_size=1, max_length=10, min_length=4, progress=False)
    assert identity(out / "train-00000.tar") == first
    assert summary["throughput"]["shards_skipped"] == 1 and summary["throughput"]["shards_processed"] == 1
    assert not list(out.glob(".*.tmp"))
    after = decisions(out, "train-00001")  # same captions with another batch size
    assert [(r["key"], r["source"], r["text"]) for r in after] == [(r["key"], r["source"], r["text"]) for r in before]
    assert [r["itm"] for r in after] == pytest.approx([r["itm"] for r in before], abs=1e-5)
    assert summary["samples"] == 6


def test_cli_killed_and_rerun_writes_every_sample_once(blip, tmp_path):
    from openblip.checkpoints import save_model

    save_model(blip.model, blip.tokenizer, tmp_path / "model")
    pattern = make_shards(tmp_path / "in", n_shards=6, per_shard=6)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "openblip", "capfilt", "--captioner", str(tmp_path / "model"),
           "--filter", str(tmp_path / "model"), "--input", pattern, "--output", str(out), "--device", "cpu",
           "--max-length", "10", "--min-length", "4", "--batch-size", "2", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list(out.glob("train-*.tar")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {p.name: identity(p) for p in out.glob("train-*.tar")}
    assert 0 < len(finished) < 6, "the kill should land between the first and the last shard"

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert f"summary: {out / 'summary.json'}" in rerun.stdout and "kept: web " in rerun.stdout
    assert {name: identity(out / name) for name in finished} == finished
    keys = [s["__key__"] for samples in read_dir(out).values() for s in samples]
    assert len(keys) == len(set(keys)) == 36 and len(read_dir(out)) == 6
    assert not list(out.glob(".*.tmp"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["throughput"]["shards_skipped"] == len(finished)


def test_cli_rejects_missing_input(tmp_path, capsys):
    code = cli_main(["capfilt", "--input", str(tmp_path / "none-{0..3}.tar"), "--output", str(tmp_path / "o")])
    assert code == 2 and "missing" in capsys.readouterr().err


def test_cli_filter_only_loads_no_captioner(blip, tmp_path, capsys):
    from openblip.checkpoints import save_model

    save_model(blip.model, blip.tokenizer, tmp_path / "model")
    pattern = make_shards(tmp_path / "in", n_shards=1, per_shard=2)
    # The captioner path does not exist: with --num-captions 0 it is never opened.
    code = cli_main(["capfilt", "--captioner", str(tmp_path / "no-such-model"), "--filter", str(tmp_path / "model"),
                     "--input", pattern, "--output", str(tmp_path / "out"), "--num-captions", "0", "--device", "cpu",
                     "--no-progress"])
    assert code == 0 and "synthetic 0/0" in capsys.readouterr().out
    code = cli_main(["capfilt", "--input", pattern, "--output", str(tmp_path / "o"), "--num-captions", "-1"])
    assert code == 2 and "--num-captions must be 0" in capsys.readouterr().err
