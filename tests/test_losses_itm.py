import math

import pytest
import torch
import torch.nn.functional as F

from openblip.losses.itm import itm_labels, itm_loss, sample_hard_negatives


@pytest.fixture(autouse=True)
def _one_thread():
    # These tests make hundreds of calls on tiny tensors; on a busy machine the intra-op thread
    # pool's hand-offs (softmax parallelises over rows) cost more than the work itself.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _sims(b, m=None, seed=0, scale=5.0):
    g = torch.Generator().manual_seed(seed)
    m = b if m is None else m
    return torch.randn(b, m, generator=g) * scale, torch.randn(b, m, generator=g) * scale


def _draw_many(sim_i2t, sim_t2i, draws, **kwargs):
    g = torch.Generator().manual_seed(0)
    neg_img, neg_txt = zip(*(sample_hard_negatives(sim_i2t, sim_t2i, generator=g, **kwargs) for _ in range(draws)))
    return torch.stack(neg_img), torch.stack(neg_txt)  # (draws, B) each


def _tiled(sim, idx, copies):
    # The same rows repeated `copies` times against the same candidates: one call, many draws.
    return sim.repeat(copies, 1), idx.repeat(copies), idx


def test_never_returns_the_diagonal():
    sim_i2t, sim_t2i = _sims(64)
    # Make the positives by far the most similar, the case where sampling them would be likeliest.
    sim_i2t += torch.eye(64) * 20
    sim_t2i += torch.eye(64) * 20
    neg_img, neg_txt = _draw_many(sim_i2t, sim_t2i, 40)  # 2,560 draws per direction
    rows = torch.arange(64).expand(40, 64)
    assert not bool((neg_img == rows).any()) and not bool((neg_txt == rows).any())


def test_every_negative_is_reachable():
    # Flat similarities: eps aside, each row samples uniformly among its B - 1 negatives.
    neg_img, neg_txt = _draw_many(torch.zeros(4, 4), torch.zeros(4, 4), 60)
    for r in range(4):
        assert set(neg_img[:, r].tolist()) == set(neg_txt[:, r].tolist()) == {0, 1, 2, 3} - {r}


def test_never_returns_a_same_id_candidate():
    idx = torch.tensor([0, 1, 0, 2, 1, 0, 3, 2])
    sim_i2t, sim_t2i = _sims(8, seed=1)
    rows_i2t, row_idx, cand_idx = _tiled(sim_i2t, idx, 1000)
    rows_t2i, _, _ = _tiled(sim_t2i, idx, 1000)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        neg_img, neg_txt = sample_hard_negatives(rows_i2t, rows_t2i, idx=row_idx, idx_all=cand_idx, generator=gen)
        for neg in (neg_img, neg_txt):
            assert not bool((cand_idx[neg] == row_idx).any())


def test_all_but_one_share_an_id():
    idx = torch.tensor([4, 4, 4, 9, 4])
    sim_i2t, sim_t2i = _sims(5, seed=2)
    rows_i2t, row_idx, cand_idx = _tiled(sim_i2t, idx, 2000)
    rows_t2i, _, _ = _tiled(sim_t2i, idx, 2000)
    for eps in (1e-4, 0.0):
        neg_img, neg_txt = sample_hard_negatives(rows_i2t, rows_t2i, idx=row_idx, idx_all=cand_idx, eps=eps)
        for neg in (neg_img.view(2000, 5), neg_txt.view(2000, 5)):
            # Rows of the large group have a single negative: the odd one out (index 3).
            assert bool((neg[:, [0, 1, 2, 4]] == 3).all())
            assert set(neg[:, 3].tolist()) <= {0, 1, 2, 4}


def test_global_candidates_with_idx_all():
    # Local rows are candidates 4..7 of a gathered batch of 8 (rank 1 of 2); ids are positions.
    idx = torch.arange(4, 8)
    idx_all = torch.arange(8)
    sim_i2t, sim_t2i = _sims(4, 8, seed=3)
    neg_img, neg_txt = _draw_many(sim_i2t, sim_t2i, 50, idx=idx, idx_all=idx_all)
    for neg in (neg_img, neg_txt):
        assert neg.max() < 8 and not bool((neg == idx.expand_as(neg)).any())


def test_batch_of_one_raises():
    with pytest.raises(ValueError, match="at least 2"):
        sample_hard_negatives(torch.zeros(1, 1), torch.zeros(1, 1))


def test_all_same_id_raises():
    sim_i2t, sim_t2i = _sims(3)
    with pytest.raises(ValueError, match="no negative"):
        sample_hard_negatives(sim_i2t, sim_t2i, idx=torch.tensor([2, 2, 2]))


def test_non_square_without_ids_raises():
    with pytest.raises(ValueError, match="square"):
        sample_hard_negatives(*_sims(2, 5))


@pytest.mark.parametrize(
    "fill",
    [float("inf"), float("-inf"), float("nan"), 1e30],
)
def test_non_finite_or_huge_sims_stay_safe(fill):
    sim_i2t, sim_t2i = _sims(4, seed=4)
    sim_i2t[0, :] = fill
    sim_t2i[:, 1] = fill
    sim_t2i[2, 2] = fill
    neg_img, neg_txt = _draw_many(sim_i2t, sim_t2i, 25, eps=0.0)
    rows = torch.arange(4).expand(25, 4)
    assert not bool((neg_img == rows).any()) and not bool((neg_txt == rows).any())
    assert neg_img.min() >= 0 and neg_img.max() < 4


def test_underflowed_weights_fall_back_to_uniform():
    # With eps = 0 (retrieval) every negative weight underflows to exactly 0.
    sims = torch.eye(3) * 1e4
    neg_img, _ = _draw_many(sims, sims, 60, eps=0.0)
    for r in range(3):
        assert set(neg_img[:, r].tolist()) == {0, 1, 2} - {r}


def test_an_inf_negative_is_always_chosen():
    sims = torch.zeros(3, 3)
    sims[0, 2] = float("inf")
    neg_img, neg_txt = _draw_many(sims, sims, 20, eps=0.0)
    assert bool((neg_img[:, 0] == 2).all()) and bool((neg_txt[:, 0] == 2).all())


def test_frequencies_follow_the_softmax():
    sims = torch.tensor([[0.0, 1.0, 2.0]]).repeat(4000, 1)
    idx = torch.zeros(4000, dtype=torch.long)  # every row's positive is candidate 0
    neg_img, _ = sample_hard_negatives(sims, sims, idx=idx, idx_all=torch.tensor([0, 1, 2]), eps=0.0)
    share_of_2 = (neg_img == 2).float().mean().item()
    assert share_of_2 == pytest.approx(math.e / (1 + math.e), abs=0.03)  # weights e^1 vs e^2


def test_matches_the_original_per_row_loop_on_cpu():
    sim_i2t, sim_t2i = _sims(5, seed=5, scale=1.0)
    torch.manual_seed(42)
    neg_img, neg_txt = sample_hard_negatives(sim_i2t, sim_t2i)
    torch.manual_seed(42)
    w_t2i = F.softmax(sim_t2i, dim=1) + 1e-4
    w_t2i.fill_diagonal_(0)
    w_i2t = F.softmax(sim_i2t, dim=1) + 1e-4
    w_i2t.fill_diagonal_(0)
    ref_img = [torch.multinomial(w_t2i[b], 1).item() for b in range(5)]
    ref_txt = [torch.multinomial(w_i2t[b], 1).item() for b in range(5)]
    assert neg_img.tolist() == ref_img and neg_txt.tolist() == ref_txt


def test_generator_makes_draws_reproducible():
    sims = _sims(6, seed=6)
    a = sample_hard_negatives(*sims, generator=torch.Generator().manual_seed(3))
    b = sample_hard_negatives(*sims, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_itm_labels_and_loss():
    labels = itm_labels(2)
    assert labels.tolist() == [1, 1, 0, 0, 0, 0] and labels.dtype == torch.long
    logits = torch.tensor([[0.0, math.log(3.0)]] * 6)  # p(match) = 3/4 everywhere
    expected = (2 * -math.log(0.75) + 4 * -math.log(0.25)) / 6
    assert itm_loss(logits, labels).item() == pytest.approx(expected, abs=1e-6)


def test_also_positive_pairs_are_never_drawn_unless_a_row_would_have_no_negative():
    import torch as _t

    from openblip.losses import sample_hard_negatives as _sample

    sims = _t.zeros(4, 4)
    extra = _t.zeros(4, 4, dtype=_t.bool)
    extra[0, 1] = extra[1, 0] = True  # rows 0 and 1 share a caption
    extra[2, :] = True  # row 2: would leave no negative -> falls back to the diagonal rule
    gen = _t.Generator().manual_seed(0)
    for _ in range(200):
        neg_img, neg_txt = _sample(sims, sims, generator=gen, also_positive=extra)
        assert neg_img[0] not in (0, 1) and neg_img[1] not in (0, 1)
        assert neg_txt[0] not in (0, 1) and neg_txt[1] not in (0, 1)
        assert neg_img[2] != 2 and neg_img[3] != 3
