"""Two processes with half the batch each give the losses of one process with the whole batch."""

import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from openblip import BlipModel, preset
from openblip.tokenizer import BlipTokenizer
from openblip.train.tasks import PretrainTask

# Same number of tokens in every caption, so per-rank token means average to the global mean.
CAPTIONS = ["a red square on white", "a blue circle on white", "a green square on grey", "a small dog on grass",
            "a yellow circle on red", "a large cat on bed", "a plane in blue sky", "a car on the road"]


def _task():
    torch.manual_seed(0)
    task = PretrainTask(BlipModel(preset("tiny")), BlipTokenizer.default(), queue_size=32)
    return task.eval()  # no dropout / drop-path: the comparison must be deterministic


def _pixels():
    return torch.randn(len(CAPTIONS), 3, 64, 64, generator=torch.Generator().manual_seed(1))


def _worker(rank: int, world: int, port: int, out: str, shards: str) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from openblip.train import distributed as dist

    info = dist.init_distributed("gloo")
    task = _task()
    half = len(CAPTIONS) // world
    part = slice(rank * half, (rank + 1) * half)
    with torch.no_grad():
        losses = task(_pixels()[part], CAPTIONS[part], step=0, generator=torch.Generator().manual_seed(rank))
    result = {k: float(v) for k, v in losses.items()}
    result["queue"] = task.contrast.queue.image_queue.clone()
    result["all_ranks"] = (dist.all_ranks(rank == 0), dist.all_ranks(True))
    # And a real DDP training run over shards split between the ranks.
    from openblip.train.config import load_train_config
    from openblip.train.run import train

    cfg = load_train_config("tiny").replace(max_steps=2, batch_size=4, queue_size=16, num_workers=0, save_every=2)
    train(cfg, shards, Path(out) / "run", info=info, progress=False)
    torch.save(result, Path(out) / f"rank{rank}.pt")
    dist.cleanup()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    from helpers_data import make_shards

    out = tmp_path_factory.mktemp("ddp")
    shards = make_shards(out / "shards", n_shards=2, per_shard=8)
    mp.spawn(_worker, args=(2, _free_port(), str(out), shards), nprocs=2, join=True)
    return out, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_itc_and_lm_losses_match_one_process_with_the_global_batch(two_ranks):
    _, ranks = two_ranks
    with torch.no_grad():
        single = _task()(_pixels(), CAPTIONS, step=0, generator=torch.Generator().manual_seed(0))
    for name in ("loss_itc", "loss_lm"):
        mean = sum(r[name] for r in ranks) / 2
        assert mean == pytest.approx(float(single[name]), abs=1e-5), name
    # ITM draws its hard negatives at random within each rank: finite, not equal.
    assert all(torch.isfinite(torch.tensor(r["loss_itm"])) for r in ranks)


def test_every_rank_holds_the_same_queue_as_one_process(two_ranks):
    _, ranks = two_ranks
    task = _task()
    with torch.no_grad():
        task(_pixels(), CAPTIONS, step=0)
    assert torch.allclose(ranks[0]["queue"], ranks[1]["queue"])
    assert torch.allclose(ranks[0]["queue"], task.contrast.queue.image_queue, atol=1e-6)


def test_ddp_training_run_writes_one_checkpoint_with_every_ranks_position(two_ranks):
    out, ranks = two_ranks
    state = torch.load(out / "run/checkpoints/step-00000002/training_state.pt", weights_only=True)
    assert state["world_size"] == 2 and state["step"] == 2
    assert [r["data"]["position"] for r in state["ranks"]] == [8, 8]
    # Ranks agree on "every rank has a batch" (the step-skipping rule for unreadable batches).
    assert [r["all_ranks"] for r in ranks] == [(False, True), (False, True)]
    assert (out / "run/model.safetensors").is_file()
