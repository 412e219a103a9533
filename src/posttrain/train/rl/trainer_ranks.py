"""`placement: ray` with `ray_trainer_ranks: N`: the whole RL run in N Ray actors, the ranks of one process group.

Each rank runs exactly what `torchrun --nproc_per_node N` runs in its process (the same recipe, a torch.distributed
group over gloo on CPU or NCCL on GPU, DDP or `fsdp` / `deepspeed` as configured), but Ray places the ranks: one
placement group bundle each (`ray_num_cpus_per_role`, `ray_num_gpus_per_role`; `ray_placement_strategy` PACK
or SPREAD over the nodes of a cluster joined with `ray_address: auto`). Every rank holds every role (actor, critic,
reference, reward model, sampler), colocated as veRL's hybrid workers hold them, or with `ray_separate_roles` the
sampler, reference and reward model run in Ray actors of their own in the same placement group, which every rank
uses (OpenRLHF's layout: rank 0 builds them and sends the sampler its weights); rank 0 writes the output folder,
which on several nodes must be on a filesystem they share, as under torchrun. The `posttrain` process only places
the ranks, shows their output and waits; when one rank fails the others are stopped rather than left waiting in a
collective.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from posttrain.errors import PosttrainError
from posttrain.train.loop import TrainResult
from posttrain.train.rl.placement import RaySession, RemoteRole, RoleLost, role_failure, roles_of

log = logging.getLogger(__name__)


# Passed on to the ranks: on a cluster joined with `ray_address`, Ray's workers do not inherit this process's
# environment (a local Ray started here does).
FORWARDED_ENV = ("POSTTRAIN_", "HF_", "TRANSFORMERS_", "TOKENIZERS_", "NCCL_", "GLOO_", "TORCH_")


class TrainerRank:
    """Runs in a rank's Ray actor."""

    @staticmethod
    def where() -> tuple[str, str, int]:
        """This actor's node (its Ray id and address) and a free port on it: rank 0's are the group's rendezvous."""
        import socket

        import ray

        with socket.socket() as sock:
            sock.bind(("", 0))
            return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address(), sock.getsockname()[1]

    @staticmethod
    def run(config, rank: int, world_size: int, local_world_size: int, master: tuple[str, int], cwd: str,
            env: dict[str, str], roles: tuple | None = None) -> dict:
        """`roles`: (the placement group, each role's bundle, the run's tag) with ray_separate_roles."""
        from posttrain.cli import setup_logging
        from posttrain.train import distributed as dist
        from posttrain.train.rl.recipe import train_here

        # What torchrun sets. Ray shows each actor only the GPUs of its bundle, so this rank's is cuda:0.
        os.environ.update(env, MASTER_ADDR=master[0], MASTER_PORT=str(master[1]), RANK=str(rank), LOCAL_RANK="0",
                          WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(local_world_size))
        if os.path.isdir(cwd):  # relative paths in the config mean what they mean where `posttrain` was started
            os.chdir(cwd)
        setup_logging()  # as the command sets it up in each torchrun process: rank 0 logs, the others warn
        try:
            shared = SharedRoles(config, *roles) if roles else None
            result = train_here(config, placed=shared)  # the config as given: its saved copy reruns this layout
            if shared is not None:
                shared.all_ranks_here()  # rank 0 holds the shared roles until every rank is done with them
        finally:
            dist.cleanup()
        return {"global_step": result.global_step, "output_dir": str(result.output_dir),
                "plot": str(result.plot) if result.plot else None, "metrics": result.metrics if rank == 0 else []}


class SharedRoles(RaySession):
    """In a trainer rank, with ray_separate_roles: the roles' actors in the driver's placement group. Rank 0 builds
    each (a named actor) and holds it until every rank is done, the other ranks find it by name; rank 0 alone sends
    the sampler its weights, and no rank samples again before it has them.

    The ranks wait for each other here over a gloo group of their own with a long timeout: while one waits, rank 0
    may be building a role (loading a model, starting vLLM) or sending the weights, alone, for longer than the
    default group's NCCL watchdog allows (10 min)."""

    def __init__(self, config, group, bundles: dict[str, int], tag: str):
        import ray

        self.ray, self.started, self.tag = ray, False, tag
        self.adopt(config, group, bundles, max(1, int(config.ray_num_cpus_per_role)))
        self.built: list[RemoteRole] = []  # rank 0's handles: a role lives as long as its owner holds one
        self.waits = None  # the ranks' gloo group, made at the first wait (every rank comes to it)

    @property
    def leads(self) -> bool:
        from posttrain.train import distributed as dist

        return dist.is_main()

    def host(self, role: str, build, *args, **kwargs):
        if self.leads:
            self.built.append(super().host(role, build, *args, **kwargs))
            self.built[-1].ready()  # built (or failed) before the other ranks look for it
        self.all_ranks_here()
        return self.built[-1] if self.leads else RemoteRole(self.ray, self.ray.get_actor(self.name(role)), role)

    def actor_options(self, role: str) -> dict:
        return {"name": self.name(role)}

    def name(self, role: str) -> str:
        return f"{self.tag} {role}"

    def all_ranks_here(self) -> None:
        import torch.distributed

        from posttrain.train.rl.weight_sync import TIMEOUT

        if self.waits is None:
            self.waits = torch.distributed.new_group(backend="gloo", timeout=TIMEOUT)
        torch.distributed.barrier(group=self.waits)

    def close(self) -> None:
        """The driver removes the placement group, and the roles' actors with it."""


def run_trainer_ranks(config) -> TrainResult:
    import uuid

    count = config.ray_trainer_ranks
    ranks = [f"trainer {i}" for i in range(count)]
    shared = roles_of(config) if config.ray_separate_roles else []
    session = RaySession(config, roles=ranks + shared, threads=max(1, int(config.ray_num_cpus_per_role)),
                         log_to_driver=True)
    roles = (session.group, {role: session.bundles[role] for role in shared}, f"posttrain-{uuid.uuid4().hex[:8]}") \
        if shared else None
    try:
        hosts = [session.host(f"trainer {i}", TrainerRank) for i in range(count)]
        places = [host.call("where") for host in hosts]
        # Ranks numbered node by node, as torchrun numbers them: a node's ranks are consecutive, and each knows how
        # many share its node (the memory plan divides the node's RAM by it; hybrid_shard shards within it).
        order = sorted(range(count), key=lambda i: (places[i][0] != places[0][0], places[i][0], i))
        per_node = {node: sum(p[0] == node for p in places) for node, _, _ in places}
        master = places[order[0]][1:]
        env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV)}
        log.info("Ray placement: %d trainer ranks on %d node(s), rendezvous at %s:%d%s", count, len(per_node), *master,
                 f"; {', '.join(shared)} in actors of their own" if shared else "")
        refs = {host_index: hosts[host_index].start("run", config, rank, count, per_node[places[host_index][0]],
                                                    master, os.getcwd(), env, roles)
                for rank, host_index in enumerate(order)}
        _wait_all(session, hosts, refs, order)
        out = session.ray.get(refs[order[0]])
    finally:
        session.close()
    return TrainResult(out["global_step"], None, None, Path(out["output_dir"]), Path(out["plot"]) if out["plot"]
                       else None, out["metrics"], None)


def _wait_all(session, hosts, refs: dict, order: list[int]) -> None:
    """Until every rank has finished. At the first failure the others get a few seconds to fail too (a rank that
    raised closes its connections, so its peers fail next with 'connection closed'): the error shown is a rank's
    own one-line error where one raised it, then every rank is stopped."""
    ray = session.ray
    pending = list(refs.values())
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        try:
            ray.get(done[0])
            continue
        except ray.exceptions.RayError:
            pass
        ray.wait(pending, num_returns=len(pending), timeout=5)
        errors = []  # (how much it says about the cause: 0 most, the error to show)
        for rank, host_index in enumerate(order):
            try:
                ray.get(refs[host_index], timeout=0)
            except ray.exceptions.GetTimeoutError:
                continue
            except ray.exceptions.RayError as err:
                errors.append((_telling(err), role_failure(err, f"trainer rank {rank}")))
        for host in hosts:
            ray.kill(host.actor)
        raise min(errors, key=lambda e: e[0])[1]


def _telling(err) -> int:
    """0: the rank raised a posttrain error of its own; 1: the rank's process died; 2: anything else it raised
    (a peer's closed connection among them); 3: a shared role died under it (that role's owner, rank 0, failed
    first: its own error says why)."""
    import ray

    cause = getattr(err, "cause", None)
    if isinstance(cause, RoleLost):
        return 3
    if isinstance(cause, PosttrainError):
        return 0
    return 1 if isinstance(err, ray.exceptions.RayActorError) else 2
