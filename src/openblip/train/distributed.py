"""Everything that talks to ``torch.distributed``.

Launch with ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``) or ``srun`` (``SLURM_*``; set
``MASTER_ADDR``/``MASTER_PORT`` in the job script). A single process needs no process group:
every function here degrades to the identity, so training and tests run unchanged on one device
(the original required ``torch.distributed`` even on one GPU, quirk L.7).

Collectives assume every rank contributes a tensor of the same shape (use ``drop_last``).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "DistInfo",
    "world_info_from_env",
    "init_distributed",
    "is_dist_initialized",
    "get_rank",
    "get_world_size",
    "is_main_process",
    "all_gather",
    "all_gather_with_grad",
    "all_reduce_mean",
    "barrier",
    "broadcast_object",
    "cleanup",
    "gather_objects",
]

# First variable found wins; torchrun's names come first, then MPI/SLURM/OpenMPI launchers.
_LOCAL_RANK_VARS = ("LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK")
_RANK_VARS = ("RANK", "PMI_RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK")
_WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _first_int(names: tuple[str, ...], default: int) -> int:
    for name in names:
        if name in os.environ:
            return int(os.environ[name])
    return default


def world_info_from_env() -> tuple[int, int, int]:
    """``(local_rank, rank, world_size)`` from torchrun, MPI, SLURM or OpenMPI variables."""
    return _first_int(_LOCAL_RANK_VARS, 0), _first_int(_RANK_VARS, 0), _first_int(_WORLD_SIZE_VARS, 1)


def _pick_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def init_distributed(
    backend: str | None = None,
    *,
    init_method: str = "env://",
    timeout: datetime.timedelta | None = None,
) -> DistInfo:
    """Join the process group described by the environment and pick this rank's device.

    With a world size of 1 no process group is created. ``backend`` defaults to NCCL when CUDA
    is available and Gloo otherwise. Calling it again after initialisation returns the same info.

    Args:
        backend: "nccl", "gloo", or None for the default.
        init_method: rendezvous URL; "env://" reads ``MASTER_ADDR`` and ``MASTER_PORT``.
        timeout: collective timeout (PyTorch's default when None).
    """
    local_rank, rank, world_size = world_info_from_env()
    device = _pick_device(local_rank)
    if is_dist_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)
    if world_size <= 1:
        return DistInfo(0, 1, local_rank, device)
    if init_method == "env://" and not ("MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ):
        raise RuntimeError(
            f"world size {world_size} found in the environment but MASTER_ADDR/MASTER_PORT are not set; "
            "launch with torchrun or export them in the job script"
        )
    if backend is None:
        backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
    dist.init_process_group(backend, init_method=init_method, world_size=world_size, rank=rank, **kwargs)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def is_dist_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def _gather_list(tensor: Tensor) -> list[Tensor]:
    # The list form of all_gather works on every backend (Gloo lacks some *_into_tensor paths).
    parts = [torch.empty_like(tensor) for _ in range(get_world_size())]
    dist.all_gather(parts, tensor)
    return parts


@torch.no_grad()
def all_gather(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` from all ranks along dim 0, in rank order, without gradient.

    Args:
        tensor: (B, ...) with the same shape on every rank.

    Returns:
        (world_size * B, ...); the detached input itself in a single process.
    """
    if get_world_size() == 1:
        return tensor.detach()
    return torch.cat(_gather_list(tensor.contiguous()), dim=0)


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward sums every rank's gradient and keeps this rank's slice."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:
        ctx.local_size = tensor.shape[0]
        return torch.cat(_gather_list(tensor.contiguous()), dim=0)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> Tensor:
        # Each rank's loss saw every shard, so the gradient of a shard is the sum over ranks of
        # their gradients w.r.t. it. all_reduce + slice (rather than reduce_scatter) also works on
        # Gloo. Clone: grad_output may be shared with other nodes and must not change in place.
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = get_rank() * ctx.local_size
        return grad[start : start + ctx.local_size]


def all_gather_with_grad(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` from all ranks along dim 0, letting gradients flow back.

    The gradient reaching this rank's input is the sum of all ranks' gradients w.r.t. its shard,
    so summing the per-rank losses reproduces the single-process gradient on the concatenated
    batch (DDP then averages parameter gradients over ranks as usual).

    Args:
        tensor: (B, ...) with the same shape on every rank.

    Returns:
        (world_size * B, ...); the input itself in a single process.
    """
    if get_world_size() == 1:
        return tensor
    return _AllGatherWithGrad.apply(tensor)


def all_reduce_mean(tensor: Tensor) -> Tensor:
    """Mean of ``tensor`` over ranks (a new floating tensor; the input is untouched)."""
    out = tensor.detach().clone()
    if not out.is_floating_point():
        out = out.double()
    if get_world_size() == 1:
        return out
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / get_world_size()


def all_ranks(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True when ``flag`` is true on every rank (one tiny all-reduce; no collective alone)."""
    if get_world_size() == 1:
        return flag
    value = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def barrier() -> None:
    """Wait for every rank; a no-op in a single process."""
    if is_dist_initialized():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Return rank ``src``'s picklable ``obj`` on every rank (identity in a single process)."""
    if get_world_size() == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def cleanup() -> None:
    """Leave the process group, if any."""
    if is_dist_initialized():
        dist.destroy_process_group()


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order, on every rank (``[obj]`` in a single process)."""
    if get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out
