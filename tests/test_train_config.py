"""Training configs: presets, --set overrides, model preset changes."""

from __future__ import annotations

import pytest

from openblip.train.config import load_train_config, parse_override
from openblip.train.run import build_model


def test_set_changes_nested_model_config_and_schedule():
    cfg = load_train_config("tiny")
    changes = dict(parse_override(s) for s in ("model_config.vision.patch_size=8", "model_config.embed_dim=48",
                                                "schedule.min_lr=2e-6", "positive_key=label"))
    cfg = cfg.replace(**changes)
    assert cfg.model_config == {"vision": {"patch_size": 8}, "embed_dim": 48}
    assert cfg.schedule.min_lr == 2e-6 and cfg.positive_key == "label"
    model, _ = build_model(cfg.replace(image_size=32))
    vision = model.cfg.vision
    # patch size and image size both reach the model; the rest of the preset stays
    assert (vision.patch_size, vision.image_size, vision.width, model.cfg.embed_dim) == (8, 32, 96, 48)


def test_model_config_is_refused_for_a_checkpoint(tmp_path):
    cfg = load_train_config("tiny").replace(model=str(tmp_path), model_config={"embed_dim": 48})
    with pytest.raises(ValueError, match="model_config changes a model preset"):
        build_model(cfg)


@pytest.mark.parametrize("setting, message", [
    ("model_config.vision.patchsize=8", r"unknown vision config fields: \['patchsize'\]"),
    ("model_config=5", "model_config must be a JSON object"),
    ("model_config.embed_dim=-3", r"model sizes must be positive integers, got \{'embed_dim': -3\}"),
    ("model_config.text=3", "text must be an object of TextConfig fields"),
])
def test_bad_model_config_is_a_clear_error(setting, message):
    with pytest.raises(ValueError, match=message):
        build_model(load_train_config("tiny").replace(**dict([parse_override(setting)])))
