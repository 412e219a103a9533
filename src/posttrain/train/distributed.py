"""Process-group helpers: the same code runs as one process or under `torchrun`.

Every rank runs the same plan; only rank 0 writes files. On CPU the backend is gloo, on CUDA NCCL
(one GPU per rank; not yet run on several GPUs).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init(device: torch.device) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device.type == "cuda":  # this rank's GPU is the current one: NCCL and all_reduce_sum use it
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over ranks, in place. Small statistics are built on the CPU; NCCL reduces CUDA tensors only,
    so under NCCL a CPU tensor makes a round trip through this rank's GPU."""
    return _all_reduce(t, dist.ReduceOp.SUM)


def smallest(value: float) -> float:
    """The smallest of every rank's `value` (e.g. the memory each rank has free), the same on every rank."""
    return _all_reduce(torch.tensor([value], dtype=torch.float64), dist.ReduceOp.MIN).item()


def all_gather_floats(value: float) -> list[float]:
    """Every rank's `value` in rank order, the same list on every rank (e.g. what each rank measured)."""
    slots = torch.zeros(world_size(), dtype=torch.float64)
    slots[rank()] = value
    return _all_reduce(slots, dist.ReduceOp.SUM).tolist()


def _all_reduce(t: torch.Tensor, op) -> torch.Tensor:
    if not dist.is_initialized():
        return t
    if t.device.type == "cpu" and dist.get_backend() == "nccl":
        on_gpu = t.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(on_gpu, op=op)
        t.copy_(on_gpu)
    else:
        dist.all_reduce(t, op=op)
    return t


def broadcast_object(obj):
    """Rank 0's value on every rank (e.g. a checkpoint path only rank 0 resolved)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj) -> list:
    """Every rank's value, in rank order, on every rank (e.g. each rank's own samples for a checkpoint)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
