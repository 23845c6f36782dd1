import pytest
import torch
import torch.nn.functional as F
from torch import nn

from openblip.losses.itc import itc_loss
from openblip.losses.queue import FeatureQueue, copy_params, momentum_update


def _feats(start, count, dim=2):
    # Row i is [start + i, -(start + i)]: every value identifies its sample.
    vals = torch.arange(start, start + count, dtype=torch.float32)
    return torch.stack([vals, -vals], dim=1)[:, :dim]


def test_init_matches_original_draws_and_is_normalised():
    torch.manual_seed(123)
    queue = FeatureQueue(4, 10, with_idx=True)
    torch.manual_seed(123)
    image = F.normalize(torch.randn(4, 10), dim=0)
    text = F.normalize(torch.randn(4, 10), dim=0)
    torch.testing.assert_close(queue.image_queue, image)
    torch.testing.assert_close(queue.text_queue, text)
    torch.testing.assert_close(queue.image_queue.norm(dim=0), torch.ones(10))
    assert queue.idx_queue.shape == (1, 10) and bool((queue.idx_queue == -100).all())
    assert queue.ptr.tolist() == [0]
    assert set(queue.state_dict()) == {"image_queue", "text_queue", "idx_queue", "ptr"}


def test_without_idx_has_no_idx_buffer():
    queue = FeatureQueue(2, 4)
    assert queue.idx_queue is None and "idx_queue" not in queue.state_dict()
    with pytest.raises(ValueError):
        queue.enqueue(_feats(0, 2), _feats(0, 2), idx=torch.tensor([0, 1]))


def test_enqueue_divisible_fills_in_order():
    queue = FeatureQueue(2, 4, with_idx=True)
    queue.enqueue(_feats(0, 2), _feats(100, 2), idx=torch.tensor([5, 6]))
    queue.enqueue(_feats(2, 2), _feats(102, 2), idx=torch.tensor([7, 8]))
    assert queue.ptr.tolist() == [0]
    assert queue.image_queue[0].tolist() == [0, 1, 2, 3]
    assert queue.image_queue[1].tolist() == [0, -1, -2, -3]
    assert queue.text_queue[0].tolist() == [100, 101, 102, 103]
    assert queue.idx_queue.tolist() == [[5, 6, 7, 8]]


def test_enqueue_wraps_around():
    queue = FeatureQueue(2, 5, with_idx=True)
    fill = queue.image_queue.clone()
    queue.enqueue(_feats(0, 2), _feats(0, 2), idx=torch.tensor([0, 1]))  # slots 0, 1
    queue.enqueue(_feats(2, 2), _feats(2, 2), idx=torch.tensor([2, 3]))  # slots 2, 3
    assert queue.ptr.tolist() == [4]
    torch.testing.assert_close(queue.image_queue[:, 4], fill[:, 4])  # untouched slot keeps its init
    queue.enqueue(_feats(4, 2), _feats(4, 2), idx=torch.tensor([4, 5]))  # slots 4, 0
    assert queue.ptr.tolist() == [1]
    assert queue.image_queue[0].tolist() == [5, 1, 2, 3, 4]
    assert queue.idx_queue.tolist() == [[5, 1, 2, 3, 4]]
    queue.enqueue(_feats(6, 3), _feats(6, 3), idx=torch.tensor([6, 7, 8]))  # slots 1, 2, 3
    assert queue.ptr.tolist() == [4]
    assert queue.image_queue[0].tolist() == [5, 6, 7, 8, 4]
    assert queue.text_queue[1].tolist() == [-5, -6, -7, -8, -4]


def test_batch_larger_than_queue_keeps_last_entries_in_sequence():
    queue = FeatureQueue(2, 3)
    queue.enqueue(_feats(0, 1), _feats(0, 1))  # ptr 1
    queue.enqueue(_feats(10, 5), _feats(10, 5))  # as if written one by one: slots 1,2,0,1,2
    assert queue.ptr.tolist() == [0]
    assert queue.image_queue[0].tolist() == [12, 13, 14]


def test_features_are_copies_safe_for_backward_after_enqueue():
    queue = FeatureQueue(4, 6)
    online = F.normalize(torch.randn(2, 4), dim=1).requires_grad_()
    feats_m = F.normalize(torch.randn(2, 4), dim=1)
    image_all, text_all, _ = queue.concat(feats_m, feats_m)
    assert image_all.shape == text_all.shape == (8, 4)
    torch.testing.assert_close(image_all[2:], queue.features().image.t())
    # features() copies can enter the graph directly; enqueue afterwards must not break backward.
    snap = queue.features()
    loss = (online @ snap.text).sum() + itc_loss(online, online, image_all, text_all, 0.1, alpha=0.0)
    queue.enqueue(feats_m, feats_m)
    loss.backward()
    assert online.grad is not None


def test_concat_with_idx():
    queue = FeatureQueue(2, 3, with_idx=True)
    queue.enqueue(_feats(0, 2), _feats(0, 2), idx=torch.tensor([4, 9]))
    _, _, idx_all = queue.concat(_feats(0, 2), _feats(0, 2), idx=torch.tensor([1, 2]))
    assert idx_all.tolist() == [1, 2, 4, 9, -100]


def test_state_dict_resume_is_exact():
    torch.manual_seed(0)
    queue = FeatureQueue(3, 7, with_idx=True)
    queue.enqueue(torch.randn(3, 3), torch.randn(3, 3), idx=torch.arange(3))
    state = {k: v.clone() for k, v in queue.state_dict().items()}
    torch.manual_seed(1)
    resumed = FeatureQueue(3, 7, with_idx=True)
    resumed.load_state_dict(state)
    batch = (torch.randn(3, 3), torch.randn(3, 3), torch.arange(3, 6))
    queue.enqueue(*batch)
    resumed.enqueue(*batch)
    for key, value in queue.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_enqueue_rejects_bad_shapes():
    queue = FeatureQueue(2, 4)
    with pytest.raises(ValueError):
        queue.enqueue(torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError):
        queue.enqueue(torch.zeros(2, 2), torch.zeros(3, 2))


def test_copy_params_and_momentum_update_arithmetic():
    torch.manual_seed(0)
    online = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    momentum = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    copy_params(online, momentum)
    for p, p_m in zip(online.parameters(), momentum.parameters()):
        assert torch.equal(p, p_m) and not p_m.requires_grad
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in momentum.parameters()]
    momentum_update(online, momentum, m=0.9)
    for p, p_m, old in zip(online.parameters(), momentum.parameters(), before):
        torch.testing.assert_close(p_m, 0.9 * old + 0.1 * p)
        assert p_m.grad is None and p_m.grad_fn is None


def test_momentum_update_scalar_by_hand():
    online, momentum = nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        online.weight.fill_(1.0)
        momentum.weight.fill_(0.0)
    momentum_update(online, momentum)  # default m = 0.995
    assert momentum.weight.item() == pytest.approx(0.005)
    momentum_update(online, momentum)
    assert momentum.weight.item() == pytest.approx(0.995 * 0.005 + 0.005)


def test_mismatched_modules_raise():
    with pytest.raises(ValueError):
        momentum_update(nn.Linear(2, 2), nn.Linear(2, 3))
    with pytest.raises(ValueError):
        copy_params(nn.Linear(2, 2), nn.Linear(2, 2, bias=False))
