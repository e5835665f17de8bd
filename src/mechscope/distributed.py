"""Several processes through PyTorch's own distributed engine (``torch.distributed``): the one module
the pipeline stages call for it, so no stage carries ``if rank == 0`` branches of its own.

Processes are started by ``torchrun`` (``torchrun --nproc-per-node 2 -m mechscope sweep ...``; on
several machines ``--nnodes N --node-rank R --rdzv-endpoint HOST:PORT``) or any launcher that sets
``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``. :func:`init` joins the process group
(gloo: what is exchanged here are Python objects gathered on the CPU, which NCCL would need one GPU
per rank for) and is a no-op in a single process, so every function
here also works unlaunched: one process is a world of size 1.

Work is split by index (item ``i`` goes to rank ``i % world_size``, :func:`shard`) and gathered back
in the original order (:func:`gather_in_order`); seeded work per item (a sweep's prompt ``i`` is
sampled from seed ``seed + i``) therefore gives the same results on any number of ranks.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TypeVar

__all__ = ["init", "rank", "world_size", "is_main", "shard", "gather_in_order", "all_reduce_sum_", "all_reduce_max_",
           "all_gather_tensors", "barrier"]

T = TypeVar("T")


def init(backend: str | None = None) -> None:
    """Join the process group a launcher described in the environment (once); no-op otherwise.

    ``backend``: ``gloo`` (default; CPU tensors and Python objects) or ``nccl`` (CUDA tensors, one GPU
    per rank: training all-reduces its gradients there)."""
    import torch.distributed as dist

    if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group(backend or "gloo")


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def rank() -> int:
    dist = _dist()
    return dist.get_rank() if dist else 0


def world_size() -> int:
    dist = _dist()
    return dist.get_world_size() if dist else 1


def is_main() -> bool:
    """Whether this process reports (rank 0)."""
    return rank() == 0


def shard(n_items: int) -> list[int]:
    """The indices of ``n_items`` this rank works on: ``rank, rank + world_size, ...``."""
    return list(range(rank(), n_items, world_size()))


def gather_in_order(n_items: int, mine: Sequence[T]) -> list[T]:
    """Every rank's results, back in item order (``mine`` holds this rank's, in :func:`shard` order).
    Results are pickled through ``all_gather_object``, so they can be any picklable objects."""
    dist = _dist()
    if dist is None:
        return list(mine)
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, list(mine))
    ordered: list = [None] * n_items
    for r, part in enumerate(parts):
        for index, value in zip(range(r, n_items, len(parts)), part):
            ordered[index] = value
    return ordered


def all_reduce_sum_(tensors) -> None:
    """Sum each tensor over the ranks, in place (no-op in one process). The tensors are flattened into
    one buffer per dtype and device, so a step costs one collective, not one per tensor."""
    dist = _dist()
    if dist is None:
        return
    import torch

    groups: dict = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for group in groups.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat)
        offset = 0
        for t in group:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def all_reduce_max_(tensor) -> None:
    """Element-wise maximum over the ranks, in place (no-op in one process)."""
    dist = _dist()
    if dist is not None:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)


def all_gather_tensors(tensor) -> list:
    """Every rank's ``tensor`` (same shape on every rank), in rank order; ``[tensor]`` in one process."""
    dist = _dist()
    if dist is None:
        return [tensor]
    import torch

    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return parts


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    dist = _dist()
    if dist is not None:
        dist.barrier()
