"""A run stopped at step k and resumed ends with exactly the weights of a straight run."""

import json

import pytest
import torch
from safetensors.torch import load_file

import openblip
from openblip.train.config import load_train_config
from openblip.train.run import train

from helpers_data import make_shards


def _cfg(**kw):
    base = dict(max_steps=6, batch_size=4, queue_size=12, log_every=1, save_every=3, num_workers=0,
                alpha_ramp_steps=4, keep_checkpoints=5)
    base.update(kw)
    return load_train_config("tiny").replace(**base)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"), n_shards=2, per_shard=10)


def test_resume_reproduces_a_straight_run_exactly(shards, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(_cfg(), shards, straight, progress=False)
    # Same run, stopped after step 3 (as if killed right after the checkpoint), then resumed.
    train(_cfg(), shards, split, progress=False, stop_at=3)
    assert not (split / "checkpoints/step-00000006").exists()
    train(_cfg(), shards, split, resume=True, progress=False)
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(split / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # Momentum encoders, queues and optimizer moments are part of the exact state too.
    sa = torch.load(straight / "checkpoints/step-00000006/training_state.pt", weights_only=True)
    sb = torch.load(split / "checkpoints/step-00000006/training_state.pt", weights_only=True)
    for key, value in sa["task"].items():
        assert torch.equal(value, sb["task"][key]), key
    assert sa["data"] == sb["data"]
    # The logged losses of steps 4-6 are the same in both runs.
    log_a = [json.loads(line) for line in (straight / "log.jsonl").read_text().splitlines()]
    log_b = [json.loads(line) for line in (split / "log.jsonl").read_text().splitlines()]
    tail = lambda log: [(r["step"], r["loss"]) for r in log if r.get("step", 0) > 3 and "loss" in r]  # noqa: E731
    assert tail(log_a) == tail(log_b) and len(tail(log_a)) == 3


def test_run_dir_is_loadable_and_a_second_run_refuses_to_overwrite(shards, tmp_path):
    run = tmp_path / "run"
    train(_cfg(max_steps=3), shards, run, progress=False)
    blip = openblip.load(run)
    assert isinstance(blip.caption(torch.rand(3, 64, 64).permute(1, 2, 0).mul(255).byte().numpy().__array__()
                                   if False else _image(), max_length=6), str)
    with pytest.raises(FileExistsError, match="--resume"):
        train(_cfg(max_steps=3), shards, run, progress=False)


def _image():
    from helpers_data import shape_image

    return shape_image("red", "circle")


def test_bf16_autocast_trains_and_warns_where_it_is_slow(shards, tmp_path, monkeypatch):
    from openblip.train import loop

    monkeypatch.setattr(loop, "cpu_has_native", lambda dtype: False)
    with pytest.warns(UserWarning, match="bf16 autocast on a CPU without bf16 matrix units"):
        train(_cfg(max_steps=2, precision="bf16"), shards, tmp_path / "run", progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run/log.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert len(losses) == 2 and all(0 < x < 100 for x in losses)
    weights = load_file(str(tmp_path / "run/model.safetensors"))
    assert all(w.dtype == torch.float32 and w.isfinite().all() for w in weights.values())  # fp32 master weights


def test_grad_accumulation_is_refused_for_contrastive_objectives(shards, tmp_path):
    with pytest.raises(ValueError, match="in-batch negatives"):
        train(_cfg(grad_accum=2), shards, tmp_path / "acc", progress=False)
