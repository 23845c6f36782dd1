import math

import pytest
import torch
import torch.nn.functional as F

from openblip.losses.itc import itc_hard_targets, itc_logits, itc_loss, ramp_alpha


def _normed(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def test_two_by_two_by_hand():
    # Orthonormal features, no queue, temp 1: every row has logits [1, 0] up to order, so each
    # direction's loss is -log(e / (e + 1)) = log(1 + 1/e).
    eye = torch.eye(2)
    loss = itc_loss(eye, eye, eye, eye, 1.0, alpha=0.0)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)


def test_temperature_scales_logits_by_hand():
    img = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    txt = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    loss = itc_loss(img, txt, img, txt, 0.5, alpha=0.0)
    sim = (img @ txt.t()) / 0.5  # [[0, 2], [1.6, 1.2]]

    def row_ce(row, pos):
        return -(row[pos] - math.log(sum(math.exp(v) for v in row)))

    i2t = (row_ce([0.0, 2.0], 0) + row_ce([1.6, 1.2], 1)) / 2
    sim_t2i = sim.t().tolist()  # [[0, 1.6], [2, 1.2]]
    t2i = (row_ce(sim_t2i[0], 0) + row_ce(sim_t2i[1], 1)) / 2
    assert loss.item() == pytest.approx((i2t + t2i) / 2, abs=1e-6)


def test_alpha_zero_is_clip_cross_entropy_with_queue():
    b, q, d, temp = 4, 6, 8, 0.07
    img, txt = _normed(b, d, seed=1), _normed(b, d, seed=2)
    img_all = torch.cat([_normed(b, d, seed=3), _normed(q, d, seed=4)])
    txt_all = torch.cat([_normed(b, d, seed=5), _normed(q, d, seed=6)])
    target = torch.arange(b)
    i2t = F.cross_entropy(img @ txt_all.t() / temp, target)
    t2i = F.cross_entropy(txt @ img_all.t() / temp, target)
    expected = (i2t + t2i) / 2
    got = itc_loss(img, txt, img_all, txt_all, temp, alpha=0.0)
    torch.testing.assert_close(got, expected)


def test_momentum_distillation_matches_soft_target_cross_entropy():
    b, q, d, temp, alpha = 3, 5, 4, 0.1, 0.4
    img, txt = _normed(b, d, seed=7), _normed(b, d, seed=8)
    img_m, txt_m = _normed(b, d, seed=9), _normed(b, d, seed=10)
    img_all = torch.cat([img_m, _normed(q, d, seed=11)])
    txt_all = torch.cat([txt_m, _normed(q, d, seed=12)])
    hard = torch.zeros(b, b + q)
    hard[range(b), range(b)] = 1
    t_i2t = alpha * torch.softmax(img_m @ txt_all.t() / temp, 1) + (1 - alpha) * hard
    t_t2i = alpha * torch.softmax(txt_m @ img_all.t() / temp, 1) + (1 - alpha) * hard
    # F.cross_entropy with probability targets is an independent implementation of the formula.
    expected = (F.cross_entropy(img @ txt_all.t() / temp, t_i2t) + F.cross_entropy(txt @ img_all.t() / temp, t_t2i)) / 2
    got = itc_loss(img, txt, img_all, txt_all, temp, alpha=alpha, image_feat_m=img_m, text_feat_m=txt_m)
    torch.testing.assert_close(got, expected)


def test_alpha_without_momentum_features_raises():
    x = _normed(2, 4)
    with pytest.raises(ValueError, match="image_feat_m"):
        itc_loss(x, x, x, x, 0.1, alpha=0.4)


def test_multi_positive_targets_by_hand():
    idx = torch.tensor([7, 7, 3])
    idx_all = torch.cat([idx, torch.tensor([3, -100, 7])])
    targets = itc_hard_targets(3, 6, idx=idx, idx_all=idx_all)
    expected = torch.tensor(
        [
            [1 / 3, 1 / 3, 0, 0, 0, 1 / 3],
            [1 / 3, 1 / 3, 0, 0, 0, 1 / 3],
            [0, 0, 1 / 2, 1 / 2, 0, 0],
        ]
    )
    torch.testing.assert_close(targets, expected)


def test_multi_positive_loss_matches_formula():
    b, q, d, temp, alpha = 4, 4, 6, 0.05, 0.3
    idx = torch.tensor([0, 1, 0, 2])
    idx_all = torch.cat([idx, torch.tensor([1, 5, -100, 0])])
    img, txt = _normed(b, d, seed=13), _normed(b, d, seed=14)
    img_m, txt_m = _normed(b, d, seed=15), _normed(b, d, seed=16)
    img_all = torch.cat([img_m, _normed(q, d, seed=17)])
    txt_all = torch.cat([txt_m, _normed(q, d, seed=18)])
    pos = (idx[:, None] == idx_all[None, :]).float()
    hard = pos / pos.sum(1, keepdim=True)
    t_i2t = alpha * torch.softmax(img_m @ txt_all.t() / temp, 1) + (1 - alpha) * hard
    t_t2i = alpha * torch.softmax(txt_m @ img_all.t() / temp, 1) + (1 - alpha) * hard
    expected = (F.cross_entropy(img @ txt_all.t() / temp, t_i2t) + F.cross_entropy(txt @ img_all.t() / temp, t_t2i)) / 2
    got = itc_loss(
        img, txt, img_all, txt_all, temp, alpha=alpha, image_feat_m=img_m, text_feat_m=txt_m, idx=idx, idx_all=idx_all
    )
    torch.testing.assert_close(got, expected)


def test_gradients_reach_online_features_and_temp_but_not_the_teacher():
    b, d = 3, 4
    img = _normed(b, d, seed=19).requires_grad_()
    txt = _normed(b, d, seed=20).requires_grad_()
    img_m = _normed(b, d, seed=21).requires_grad_()
    txt_m = _normed(b, d, seed=22).requires_grad_()
    temp = torch.nn.Parameter(torch.tensor(0.07))
    # The momentum features are passed only as teacher inputs (candidates are separate copies).
    loss = itc_loss(img, txt, img_m.detach(), txt_m.detach(), temp, alpha=0.4, image_feat_m=img_m, text_feat_m=txt_m)
    loss.backward()
    assert img.grad is not None and txt.grad is not None and temp.grad is not None
    assert img_m.grad is None and txt_m.grad is None


def test_itc_logits_shapes():
    sim_i2t, sim_t2i = itc_logits(_normed(2, 4), _normed(2, 4), _normed(5, 4), _normed(5, 4), 0.1)
    assert sim_i2t.shape == sim_t2i.shape == (2, 5)


def test_ramp_alpha_pretraining_and_retrieval():
    assert ramp_alpha(0.4, 0, 100, 2) == 0.0
    assert ramp_alpha(0.4, 50, 100, 2) == pytest.approx(0.1)
    assert ramp_alpha(0.4, 100, 100, 2) == pytest.approx(0.2)
    assert ramp_alpha(0.4, 200, 100, 2) == pytest.approx(0.4)
    assert ramp_alpha(0.4, 1234, 100, 2) == pytest.approx(0.4)
    assert ramp_alpha(0.4, 50, 100, 1) == pytest.approx(0.2)
    assert ramp_alpha(0.4, 100, 100, 1) == pytest.approx(0.4)
    assert ramp_alpha(0.4, 0, 100, 0) == 0.4
    with pytest.raises(ValueError):
        ramp_alpha(0.4, 0, 0, 1)
