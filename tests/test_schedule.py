import math

import pytest
import torch

from openblip.train.schedule import LRScheduler, ScheduleConfig, lr_at


def _pretrain(**overrides):
    cfg = dict(name="step", init_lr=3e-4, min_lr=1e-6, warmup_lr=1e-6, warmup_steps=3000, decay_rate=0.9,
               epochs=20, steps_per_epoch=5000)
    cfg.update(overrides)
    return ScheduleConfig(**cfg)


def test_pretraining_warmup_endpoints():
    cfg = _pretrain()
    assert lr_at(0, cfg) == pytest.approx(1e-6)
    assert lr_at(1500, cfg) == pytest.approx(1e-6 + (3e-4 - 1e-6) / 2)
    assert lr_at(3000, cfg) == pytest.approx(3e-4)
    assert lr_at(4999, cfg) == pytest.approx(3e-4)  # held until the end of epoch 0


def test_pretraining_epoch_step_decay_and_floor():
    cfg = _pretrain()
    assert lr_at(5000, cfg) == pytest.approx(3e-4 * 0.9)  # first step of epoch 1
    assert lr_at(9999, cfg) == pytest.approx(3e-4 * 0.9)  # constant within the epoch
    assert lr_at(10000, cfg) == pytest.approx(3e-4 * 0.81)
    assert lr_at(19 * 5000, cfg) == pytest.approx(3e-4 * 0.9**19)
    floored = _pretrain(min_lr=2e-4)
    assert lr_at(5000 * 3, floored) == pytest.approx(3e-4 * 0.9**3)  # 2.187e-4 > floor
    assert lr_at(5000 * 4, floored) == pytest.approx(2e-4)  # 1.968e-4 < floor


def test_warmup_longer_than_epoch_zero_is_cut_like_the_original():
    cfg = _pretrain(steps_per_epoch=1000)
    assert lr_at(999, cfg) == pytest.approx(1e-6 + (3e-4 - 1e-6) * 999 / 3000)
    assert lr_at(1000, cfg) == pytest.approx(3e-4 * 0.9)


def test_zero_warmup_starts_at_init_lr():
    assert lr_at(0, _pretrain(warmup_steps=0)) == pytest.approx(3e-4)


def test_cosine_per_epoch_like_the_fine_tunes():
    cfg = ScheduleConfig(name="cosine_epoch", init_lr=1e-5, min_lr=0.0, epochs=6, steps_per_epoch=100)
    assert lr_at(0, cfg) == pytest.approx(1e-5)
    assert lr_at(99, cfg) == pytest.approx(1e-5)  # constant within epoch 0, no warm-up
    assert lr_at(100, cfg) == pytest.approx(1e-5 * 0.5 * (1 + math.cos(math.pi / 6)))
    assert lr_at(300, cfg) == pytest.approx(0.5e-5)  # epoch 3 of 6: half way
    assert lr_at(599, cfg) == pytest.approx(1e-5 * 0.5 * (1 + math.cos(math.pi * 5 / 6)))
    assert lr_at(600, cfg) == pytest.approx(0.0, abs=1e-15)


def test_cosine_per_step():
    cfg = ScheduleConfig(name="cosine", init_lr=2e-5, min_lr=1e-6, epochs=2, steps_per_epoch=50)
    assert lr_at(0, cfg) == pytest.approx(2e-5)
    assert lr_at(50, cfg) == pytest.approx((2e-5 + 1e-6) / 2)
    assert lr_at(25, cfg) == pytest.approx(1e-6 + 19e-6 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(100, cfg) == pytest.approx(1e-6)
    assert lr_at(500, cfg) == pytest.approx(1e-6)  # held past the end


def test_warmup_then_cosine_per_step():
    cfg = ScheduleConfig(name="warmup_cosine", init_lr=1e-4, min_lr=0.0, warmup_lr=0.0, warmup_steps=10,
                         epochs=1, steps_per_epoch=110)
    assert lr_at(0, cfg) == 0.0
    assert lr_at(5, cfg) == pytest.approx(5e-5)
    assert lr_at(10, cfg) == pytest.approx(1e-4)
    assert lr_at(60, cfg) == pytest.approx(5e-5)
    assert lr_at(110, cfg) == pytest.approx(0.0, abs=1e-15)


def test_invalid_inputs():
    with pytest.raises(ValueError):
        lr_at(-1, _pretrain())
    with pytest.raises(ValueError):
        lr_at(0, _pretrain(steps_per_epoch=0))
    with pytest.raises(ValueError):
        lr_at(0, ScheduleConfig(name="linear"))  # type: ignore[arg-type]


def test_scheduler_sets_groups_and_resumes_from_the_step():
    cfg = _pretrain(steps_per_epoch=10, warmup_steps=4)
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.AdamW([{"params": [params[0]]}, {"params": [params[1]], "lr_scale": 0.5}], lr=123.0)
    sched = LRScheduler(opt, cfg)
    lrs = [sched.step() for _ in range(13)]  # steps 0..12
    assert lrs[2] == pytest.approx(1e-6 + (3e-4 - 1e-6) / 2)
    assert sched.get_last_lr() == pytest.approx([3e-4 * 0.9, 1.5e-4 * 0.9])
    state = sched.state_dict()
    assert state == {"last_step": 12}

    opt2 = torch.optim.AdamW([{"params": [params[0]]}, {"params": [params[1]], "lr_scale": 0.5}], lr=123.0)
    resumed = LRScheduler(opt2, cfg)
    resumed.load_state_dict(state)
    assert resumed.get_last_lr() == pytest.approx(sched.get_last_lr())
    next_lr = sched.step()
    assert resumed.step() == next_lr == lr_at(13, cfg)
    assert sched.step(25) == pytest.approx(3e-4 * 0.81)
