"""`ray_weight_sync: collective`: the actor's trainable tensors reach the Ray sampler's copy over a gloo process
group of two, the trainer rank 0 and the sampler rank 1, as OpenRLHF and veRL move weights to their rollout
engines, instead of through Ray's object store (serialized into shared memory and out again on every update).

The group is a standalone one on a TCPStore of its own, apart from any default process group: a trainer in the
`posttrain` process has none (creating one would make the rest of the code believe it runs several ranks), and
rank 0 of Ray trainer ranks that share the sampler (trainer_ranks.py) has one the sampler is not in. Gloo moves host
tensors (a GPU side sends and receives through host copies). NCCL between the two GPUs is not used: Ray does not
know which GPU the trainer's process holds, so it may give the sampler the same one, which NCCL refuses.
The trainer's side waits on the group while watching the sampler's Ray call (placement.RemoteRole.alongside), so a
sampler that fails ends the wait with its own error rather than the group's timeout.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

from posttrain.errors import ConfigError

# A backstop only: a peer that fails is noticed through Ray, one whose process dies by the closed connection.
TIMEOUT = datetime.timedelta(hours=2)


def open_store() -> tuple[dist.TCPStore, str]:
    """The trainer's side of the rendezvous, on a port the OS picks (no window for another process to take it),
    and this node's address for the sampler to reach it."""
    import ray

    store = dist.TCPStore("0.0.0.0", 0, 2, is_master=True, timeout=TIMEOUT, wait_for_workers=False)
    return store, ray.util.get_node_ip_address()


def join_store(host: str, port: int) -> dist.TCPStore:
    return dist.TCPStore(host, port, 2, is_master=False, timeout=TIMEOUT)


def layout(named: list[tuple[str, torch.Tensor]]) -> list[tuple[str, tuple[int, ...], str]]:
    """What both sides must agree on before a broadcast: the names, shapes and dtypes, in order."""
    return [(name, tuple(t.shape), str(t.dtype)) for name, t in named]


class WeightGroup:
    """One side of the two-process group. Building it waits until the other side builds its own."""

    def __init__(self, store: dist.TCPStore, rank: int):
        self.store = store
        self.group = dist.ProcessGroupGloo(store, rank, 2, TIMEOUT)

    def send(self, tensors: list[torch.Tensor]) -> None:
        for tensor in tensors:
            self.group.broadcast(self._wire(tensor.detach()), 0).wait()

    @torch.no_grad()
    def receive(self, named: list[tuple[str, torch.Tensor]], sent: list) -> None:
        """Into the tensors of `named` in place (the sampler's parameters), once their layout is the one `sent`."""
        if layout(named) != [(n, tuple(s), d) for n, s, d in sent]:
            mine = {n: (s, d) for n, s, d in layout(named)}
            wrong = next(f"{n}: {tuple(s)} {d} sent, {mine.get(n, 'absent')} here" for n, s, d in sent
                         if mine.get(n) != (tuple(s), d))
            raise ConfigError(f"the sampler's copy of the actor does not match the trainer's ({wrong})")
        for _, tensor in named:
            wire = self._wire(tensor)
            self.group.broadcast(wire, 0).wait()
            if wire is not tensor:
                tensor.copy_(wire)

    @staticmethod
    def _wire(tensor: torch.Tensor) -> torch.Tensor:
        """The tensor as gloo sends it: contiguous, on the host."""
        if tensor.device.type != "cpu":
            return tensor.to("cpu").contiguous()
        return tensor.contiguous()
