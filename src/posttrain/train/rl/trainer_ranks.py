"""`placement: ray` with `ray_trainer_ranks: N`: the whole RL run in N Ray actors, the ranks of one process group.

Each rank runs exactly what `torchrun --nproc_per_node N` runs in its process (the same recipe, a torch.distributed
group over gloo on CPU or NCCL on GPU, DDP or `fsdp` / `deepspeed` as configured), but Ray places the ranks: one
placement group bundle each (`ray_num_cpus_per_role`, `ray_num_gpus_per_role`; `ray_placement_strategy` PACK
or SPREAD over the nodes of a cluster joined with `ray_address: auto`). Every rank holds every role (actor, critic,
reference, reward model, sampler), colocated as veRL's hybrid workers hold them; rank 0 writes the output folder,
which on several nodes must be on a filesystem they share, as under torchrun. The `posttrain` process only places
the ranks, shows their output and waits; when one rank fails the others are stopped rather than left waiting in a
collective.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from posttrain.train.loop import TrainResult
from posttrain.train.rl.placement import RaySession, role_failure

log = logging.getLogger(__name__)


class TrainerRank:
    """Runs in a rank's Ray actor."""

    @staticmethod
    def address() -> tuple[str, int]:
        """This node's address and a free port on it: rank 0's are the group's rendezvous."""
        import socket

        import ray

        with socket.socket() as sock:
            sock.bind(("", 0))
            return ray.util.get_node_ip_address(), sock.getsockname()[1]

    @staticmethod
    def run(config, rank: int, world_size: int, master: tuple[str, int]) -> dict:
        from posttrain.cli import setup_logging
        from posttrain.train import distributed as dist
        from posttrain.train.rl.recipe import train_here

        # What torchrun sets. Ray shows each actor only the GPUs of its bundle, so this rank's is cuda:0.
        os.environ.update(MASTER_ADDR=master[0], MASTER_PORT=str(master[1]), RANK=str(rank), LOCAL_RANK="0",
                          WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE="1")
        setup_logging()  # as the command sets it up in each torchrun process: rank 0 logs, the others warn
        try:
            result = train_here(config)  # the config as given: the saved posttrain_config.yaml reruns this layout
        finally:
            dist.cleanup()
        return {"global_step": result.global_step, "output_dir": str(result.output_dir),
                "plot": str(result.plot) if result.plot else None, "metrics": result.metrics if rank == 0 else []}


def run_trainer_ranks(config) -> TrainResult:
    ranks = config.ray_trainer_ranks
    session = RaySession(config, roles=[f"trainer rank {i}" for i in range(ranks)],
                         threads=max(1, int(config.ray_num_cpus_per_role)), log_to_driver=True)
    try:
        hosts = [session.host(f"trainer rank {i}", TrainerRank) for i in range(ranks)]
        master = hosts[0].call("address")
        log.info("Ray placement: %d trainer ranks, rendezvous at %s:%d", ranks, *master)
        refs = [host.start("run", config, i, ranks, master) for i, host in enumerate(hosts)]
        pending = list(refs)
        while pending:  # the first failure stops every rank: the others would wait in a collective for it
            done, pending = session.ray.wait(pending, num_returns=1)
            try:
                session.ray.get(done[0])
            except session.ray.exceptions.RayError as err:
                for host in hosts:
                    session.ray.kill(host.actor)
                raise role_failure(err, f"trainer rank {refs.index(done[0])}") from None
        out = session.ray.get(refs[0])
    finally:
        session.close()
    return TrainResult(out["global_step"], None, None, Path(out["output_dir"]), Path(out["plot"]) if out["plot"]
                       else None, out["metrics"], None)
