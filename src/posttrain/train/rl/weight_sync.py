"""`ray_weight_sync: collective`: the actor's trainable tensors reach the Ray sampler's copy over a gloo process
group of two, the trainer rank 0 and the sampler rank 1, as OpenRLHF and veRL move weights to their rollout
engines, instead of through Ray's object store (serialized into shared memory and out again on every update).

The group is a standalone one on a TCPStore of its own: the trainer runs as one process and has no default
process group, and creating one would make the rest of the code believe it runs several ranks. Gloo moves host
tensors (a GPU side sends and receives through host copies). NCCL between the two GPUs is not used: Ray does not
know which GPU the trainer's process holds, so it may give the sampler the same one, which NCCL refuses.
"""

from __future__ import annotations

import datetime
import socket

import torch
import torch.distributed as dist

TIMEOUT = datetime.timedelta(minutes=10)


def free_address() -> tuple[str, int]:
    """This node's address and a free port on it, for the trainer's side of the store."""
    import ray

    with socket.socket() as sock:
        sock.bind(("", 0))
        return ray.util.get_node_ip_address(), sock.getsockname()[1]


class WeightGroup:
    """One side of the two-process group. Building it waits until the other side builds its own."""

    def __init__(self, host: str, port: int, rank: int):
        self.store = dist.TCPStore(host, port, 2, is_master=rank == 0, timeout=TIMEOUT, wait_for_workers=False)
        self.group = dist.ProcessGroupGloo(self.store, rank, 2, TIMEOUT)

    def send(self, tensors: list[torch.Tensor]) -> None:
        for tensor in tensors:
            self.group.broadcast(self._wire(tensor.detach()), 0).wait()

    @torch.no_grad()
    def receive(self, tensors: list[torch.Tensor]) -> None:
        """Into `tensors` in place (the sampler's parameters), in the order the trainer sent them."""
        for tensor in tensors:
            wire = self._wire(tensor)
            self.group.broadcast(wire, 0).wait()
            if wire is not tensor:
                tensor.copy_(wire)

    def _wire(self, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor as gloo sends it: contiguous, on the host."""
        if tensor.device.type != "cpu":
            return tensor.to("cpu").contiguous()
        return tensor.contiguous()
