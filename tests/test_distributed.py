import datetime
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from openblip.losses.itc import itc_loss
from openblip.losses.queue import FeatureQueue
from openblip.train import distributed as D

_ENV_VARS = [
    *D._LOCAL_RANK_VARS, *D._RANK_VARS, *D._WORLD_SIZE_VARS, "MASTER_ADDR", "MASTER_PORT",
]


@pytest.fixture
def clean_env(monkeypatch):
    for name in _ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------- single process, no process group


def test_world_info_defaults_and_torchrun(clean_env):
    assert D.world_info_from_env() == (0, 0, 1)
    clean_env.setenv("LOCAL_RANK", "1")
    clean_env.setenv("RANK", "5")
    clean_env.setenv("WORLD_SIZE", "8")
    assert D.world_info_from_env() == (1, 5, 8)


def test_world_info_slurm_and_precedence(clean_env):
    clean_env.setenv("SLURM_LOCALID", "2")
    clean_env.setenv("SLURM_PROCID", "6")
    clean_env.setenv("SLURM_NTASKS", "16")
    assert D.world_info_from_env() == (2, 6, 16)
    clean_env.setenv("RANK", "3")  # torchrun inside an allocation wins over srun's view
    assert D.world_info_from_env() == (2, 3, 16)


def test_init_single_process_creates_no_group(clean_env):
    info = D.init_distributed()
    assert (info.rank, info.world_size, info.local_rank) == (0, 1, 0)
    assert not info.distributed and info.is_main
    assert not D.is_dist_initialized()


def test_init_without_rendezvous_raises_clearly(clean_env):
    clean_env.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        D.init_distributed()


def test_single_process_functions_are_identities():
    x = torch.randn(3, 2, requires_grad=True)
    gathered = D.all_gather(x)
    assert torch.equal(gathered, x) and not gathered.requires_grad
    assert D.all_gather_with_grad(x) is x
    mean = D.all_reduce_mean(torch.tensor([1, 2]))
    assert mean.tolist() == [1.0, 2.0] and mean.is_floating_point()
    assert D.broadcast_object({"a": 1}) == {"a": 1}
    D.barrier()
    D.cleanup()
    assert D.is_main_process() and D.get_rank() == 0 and D.get_world_size() == 1


# ---------------------------------------------------------------- two Gloo processes

_B, _DIM = 3, 4


def _assert_close(actual, expected):
    # torch.testing.assert_close costs ~2 s of lazy imports on its first call in a fresh process.
    assert torch.allclose(actual, expected, rtol=1e-5, atol=1e-6), (actual, expected)


def _global_data():
    g = torch.Generator().manual_seed(0)
    n = 2 * _B
    return F.normalize(torch.randn(n, _DIM, generator=g), dim=1), F.normalize(torch.randn(n, _DIM, generator=g), dim=1)


def _check_gather_and_reductions(rank: int) -> None:
    local = torch.arange(_B * 2, dtype=torch.float32).view(_B, 2) + 100 * rank
    local.requires_grad_()
    gathered = D.all_gather(local)
    expected = torch.cat([torch.arange(_B * 2.0).view(_B, 2), torch.arange(_B * 2.0).view(_B, 2) + 100])
    assert torch.equal(gathered, expected) and not gathered.requires_grad
    assert D.all_reduce_mean(torch.tensor(rank + 1.0)).item() == 1.5
    assert D.all_reduce_mean(torch.tensor(rank)).item() == 0.5
    assert D.broadcast_object({"from": rank}) == {"from": 0}
    assert D.is_main_process() == (rank == 0)
    D.barrier()


def _check_gather_with_grad(rank: int) -> None:
    images, texts = _global_data()
    # Reference: one process, loss on the concatenated batch (contrast candidates = whole batch).
    ref_img, ref_txt = images.clone().requires_grad_(), texts.clone().requires_grad_()
    temp = 0.1
    itc_loss(ref_img, ref_txt, ref_img, ref_txt, temp, alpha=0.0).backward()

    rows = slice(rank * _B, (rank + 1) * _B)
    img, txt = images[rows].clone().requires_grad_(), texts[rows].clone().requires_grad_()
    img_all, txt_all = D.all_gather_with_grad(img), D.all_gather_with_grad(txt)
    ids = torch.arange(rank * _B, (rank + 1) * _B)
    # Each rank averages over its B rows; the global mean is the average of the 2 rank losses.
    local = itc_loss(img, txt, img_all, txt_all, temp, alpha=0.0, idx=ids, idx_all=torch.arange(2 * _B))
    (local / 2).backward()
    _assert_close(img.grad, ref_img.grad[rows])
    _assert_close(txt.grad, ref_txt.grad[rows])

    # A loss that uses only the gathered tensor: each shard's gradient comes from both ranks.
    ref = images.clone().requires_grad_()
    (ref.sum(0) ** 2).sum().backward()
    shard = images[rows].clone().requires_grad_()
    # Rank r owns the term of output column r; the total over ranks equals the reference loss.
    per_rank = D.all_gather_with_grad(shard).sum(0) ** 2
    per_rank[rank::2].sum().backward()
    _assert_close(shard.grad, ref.grad[rows])


def _check_queue_stays_in_sync(rank: int) -> None:
    torch.manual_seed(0)
    queue = FeatureQueue(_DIM, 8)
    images, texts = _global_data()
    rows = slice(rank * _B, (rank + 1) * _B)
    for _ in range(3):  # 3 x 6 entries into 8 slots: wraps around
        queue.enqueue(D.all_gather(images[rows]), D.all_gather(texts[rows]))
    both = D.all_gather(queue.image_queue.t().contiguous())
    assert torch.equal(both[:8], both[8:])
    assert queue.ptr.item() == (3 * 2 * _B) % 8


def _worker(rank: int, world_size: int, port: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    info = D.init_distributed(timeout=datetime.timedelta(seconds=60))
    try:
        assert (info.rank, info.world_size, info.local_rank) == (rank, world_size, rank)
        assert torch.distributed.get_backend() == "gloo"
        _check_gather_and_reductions(rank)
        _check_gather_with_grad(rank)
        _check_queue_stays_in_sync(rank)
    finally:
        D.cleanup()


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with Gloo")
def test_two_gloo_processes():
    mp.spawn(_worker, args=(2, _free_port()), nprocs=2, join=True)
