"""`placement: ray`: the RL roles other than the trained models, each in a Ray actor of its own.

The rollout sampler (a generation backend over its own copy of the actor), the reference model and
the reward model run as Ray actors, in one placement group (`ray_placement_strategy`: PACK keeps them
on as few nodes as fit, SPREAD puts each on its own node where it can), on a local Ray or a cluster
started with `ray start` (`ray_address: auto`). The trainer (actor and critic, which the update needs
together) stays in the process that runs `posttrain`, or with `ray_trainer_ranks` runs as ranks in Ray
actors of their own, each holding every role or, with `ray_separate_roles`, sharing these (trainer_ranks.py).
After each update the actor's trainable tensors (a LoRA actor's adapter alone) go to the sampler's copy,
through Ray's object store or, with `ray_weight_sync: collective`, over a process group of the two
(weight_sync.py).

Each role computes exactly what it computes in one process, with the same code, batches, seeds and
thread count, so a run gives the same result placed or not. Without `placement: ray` nothing here runs.
"""

from __future__ import annotations

import logging
import os

import torch

from posttrain.errors import ConfigError, PosttrainError

log = logging.getLogger(__name__)


def check_placement(config) -> None:
    """Before anything loads: Ray is installed and the roles' CPUs fit what it has."""
    if config.placement != "ray":
        return
    try:
        import ray  # noqa: F401
    except ImportError:
        raise ConfigError("placement: ray needs Ray: pip install 'posttrain[scale]' (or pip install ray)") from None
    from posttrain.train import distributed as dist

    if dist.world_size() > 1:
        raise ConfigError("placement: ray places the RL roles from one trainer process; launch without torchrun")


def check_ray_address(address: str) -> None:
    """A cluster address must answer before Ray is asked to join it: Ray retries an address where nothing listens
    for ever."""
    import socket

    if address == "auto":
        return  # Ray finds the cluster this machine runs, or says at once that there is none
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except ValueError:
        raise ConfigError(f"ray_address {address!r} is not HOST:PORT (or auto, or ray://HOST:PORT)") from None
    except OSError as err:
        raise ConfigError(f"ray_address {address!r}: nothing answers there ({err.strerror or err}); is `ray start "
                          "--head` running on that machine, and is the port the one it printed?") from None


def roles_apart(config) -> bool:
    """The sampler, reference and reward model run in Ray actors of their own, not in the trainer's process(es)."""
    return config.placement == "ray" and (not config.ray_trainer_ranks or config.ray_separate_roles)


def roles_of(config) -> list[str]:
    """The roles a run places: the sampler always, the reference and the reward model where it has them."""
    roles = ["rollout"]
    separate_reference = config.kl_coef > 0 or config.kl_target
    if separate_reference and not (config.finetuning_type == "lora" and not config.ref_model and not config.pissa_init):
        roles.append("reference")
    if config.reward_model:
        roles.append("reward_model")
    return roles


class RaySession:
    """Ray started (or joined) for a run, one placement group bundle per role; left as found at the end."""

    def __init__(self, config, roles: list[str] | None = None, threads: int | None = None, log_to_driver: bool = False):
        """`roles`: one bundle each (default: roles_of(config)); `threads`: torch threads in each role's actor
        (default: this process's, as the roles run in turn with the trainer); `log_to_driver`: the actors' output
        shown here (trainer ranks: their progress and log) rather than only in Ray's log folder."""
        import ray

        self.ray = ray
        self.started = not ray.is_initialized()
        if self.started:
            address = config.ray_address
            if address not in (None, "local"):
                check_ray_address(address)
            kwargs = {"num_cpus": os.cpu_count()} if address in (None, "local") else {"address": address}
            try:
                ray.init(include_dashboard=False, log_to_driver=log_to_driver, configure_logging=False, **kwargs)
            except ConnectionError as err:  # `auto` with no cluster started on this machine
                raise ConfigError(f"ray_address {address!r}: {str(err).splitlines()[0]} Start one with `ray start "
                                  "--head`, or leave ray_address unset to start Ray for this run") from None
        roles = roles or roles_of(config)
        for kind, each in (("CPU", config.ray_num_cpus_per_role), ("GPU", config.ray_num_gpus_per_role)):
            want, have = each * len(roles), ray.cluster_resources().get(kind, 0)
            if want > have:
                self.close()
                raise ConfigError(f"placement: ray asks {each:g} {kind}s for each of {len(roles)} roles "
                                  f"({', '.join(roles)}), {want:g} in all; the Ray cluster has {have:g}: lower "
                                  f"ray_num_{kind.lower()}s_per_role (fractions are allowed) or add nodes")
        from ray.util.placement_group import placement_group

        bundle = {"CPU": config.ray_num_cpus_per_role, **({"GPU": config.ray_num_gpus_per_role}
                                                           if config.ray_num_gpus_per_role else {})}
        self.group = placement_group([bundle] * len(roles), strategy=config.ray_placement_strategy)
        try:
            ray.get(self.group.ready(), timeout=120)
        except ray.exceptions.GetTimeoutError:
            self.close()
            raise ConfigError(f"placement: ray: no room for {len(roles)} bundles of {bundle} with strategy "
                              f"{config.ray_placement_strategy} after 120 s (enough in all, but not on the nodes "
                              "that strategy allows); lower the per-role CPUs / GPUs, or use PACK") from None
        self.adopt(config, self.group, {role: i for i, role in enumerate(roles)}, threads)
        log.info("Ray placement: %s, %g CPU each, %s", ", ".join(roles), self.cpus, config.ray_placement_strategy)

    def adopt(self, config, group, bundles: dict[str, int], threads: int | None) -> None:
        """The placement group and what each role's actor gets from it."""
        self.group, self.bundles = group, bundles
        self.cpus, self.gpus = config.ray_num_cpus_per_role, config.ray_num_gpus_per_role
        self.threads = threads or torch.get_num_threads()
        self.weight_sync = config.ray_weight_sync

    # This process builds the roles and sends the sampler its weights; trainer ranks that share roles
    # (trainer_ranks.SharedRoles) leave both to rank 0.
    leads = True

    def host(self, role: str, build, *args, **kwargs):
        """A RoleHost actor for `role`, holding build(*args, **kwargs)."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        strategy = PlacementGroupSchedulingStrategy(placement_group=self.group,
                                                    placement_group_bundle_index=self.bundles[role])
        actor = self.ray.remote(RoleHost).options(num_cpus=self.cpus, num_gpus=self.gpus, scheduling_strategy=strategy,
                                                  **self.actor_options(role)
                                                  ).remote(role, self.threads, build, *args, **kwargs)
        return RemoteRole(self.ray, actor, role)

    def actor_options(self, role: str) -> dict:
        return {}

    def all_ranks_here(self) -> None:
        """Returns once every trainer rank using these roles has come here (one trainer: at once)."""

    def close(self) -> None:
        if getattr(self, "group", None) is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.group)
            self.group = None
        if self.started and self.ray.is_initialized():
            self.ray.shutdown()


class RoleHost:
    """Runs in the role's Ray actor process: builds the role's object, then calls its methods."""

    def __init__(self, role: str, threads: int, build, *args, **kwargs):
        self.role = role
        torch.set_num_threads(threads)
        self.held = build(*args, **kwargs)

    def __repr__(self) -> str:  # Ray's prefix of this actor's output lines: "(trainer 1 pid=...)"
        return self.role

    def call(self, method: str, *args, **kwargs):
        return getattr(self.held, method)(*args, **kwargs)

    def ready(self) -> bool:
        return True

    def attr(self, name: str):
        return getattr(self.held, name)


class RoleLost(ConfigError):
    """A role's actor died under a call (its process crashed, or the trainer rank that owned it failed)."""


def role_failure(error, role: str) -> PosttrainError:
    """What a role's failure is to the user: the role's own one-line error where it raised one (bad data found in
    the actor reads as it would in one process), else the Ray error naming the role."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, PosttrainError):
        return cause
    import ray

    lines = str(error).strip().splitlines() or ["?"]
    if isinstance(error, ray.exceptions.RayActorError):
        return RoleLost(f"the Ray actor of the {role} died: {lines[0]}")
    # One line: a task error's text holds the remote traceback, its cause the exception itself.
    return ConfigError(f"the Ray {role} role failed: " + (f"{type(cause).__name__}: {cause}" if cause is not None
                                                         else lines[-1]))


def role_device() -> torch.device:
    """Where a role computes: the GPU Ray gave its actor (ray_num_gpus_per_role), else the CPU."""
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


class RemoteRole:
    """The trainer's handle on a role: `call` waits for the answer, `start` returns a ref for `wait`."""

    def __init__(self, ray, actor, role: str):
        self.ray, self.actor, self.role = ray, actor, role

    def start(self, method: str, *args, **kwargs):
        return self.actor.call.remote(method, *args, **kwargs)

    def wait(self, ref):
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayError as e:
            raise role_failure(e, self.role) from None

    def call(self, method: str, *args, **kwargs):
        return self.wait(self.start(method, *args, **kwargs))

    def alongside(self, work, ref):
        """Run `work()` here (its half of an exchange with the role, e.g. a broadcast) while the role answers `ref`
        (its half); returns what `work` returned. A role that fails ends the wait with the role's error, however
        long `work` would have waited for it."""
        import threading

        failed: list[BaseException] = []
        returned = []

        def run():
            try:
                returned.append(work())
            except BaseException as err:  # noqa: BLE001  (raised below, in this thread)
                failed.append(err)

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        while worker.is_alive():
            done, _ = self.ray.wait([ref], timeout=0.2)
            if done:
                try:
                    self.ray.get(ref)
                except self.ray.exceptions.RayError as e:
                    raise role_failure(e, self.role) from None  # `work` is left to the connection's end
                worker.join()
        self.wait(ref)
        if failed:
            raise ConfigError(f"sending to the Ray {self.role} role failed: {failed[0]}")
        return returned[0]

    def attr(self, name: str):
        return self.wait(self.actor.attr.remote(name))

    def ready(self) -> None:
        """Once the role is built; its build's error if it failed."""
        self.wait(self.actor.ready.remote())


# ---- the roles --------------------------------------------------------------------------------------

def model_spec(model) -> dict:
    """What rebuilds `model` in another process: its config, a PEFT model's adapter config, every tensor."""
    peft = getattr(model, "peft_config", None)
    base = model.get_base_model() if peft else model
    return {"config": base.config, "peft_config": peft[model.active_adapter] if peft else None,
            "dtype": next(model.parameters()).dtype,
            "state": {k: v.detach().to("cpu") for k, v in model.state_dict().items()}}


def rebuild_model(spec: dict):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(spec["config"]).to(spec["dtype"])
    if spec["peft_config"] is not None:
        from peft import get_peft_model

        model = get_peft_model(model, spec["peft_config"])
    model.load_state_dict(spec["state"], strict=True)
    return model.eval()


class RolloutHost:
    """The sampler's side: a copy of the actor and a generation backend over it."""

    def __init__(self, spec: dict, tokenizer, kind: str, max_batch_size: int, seed: int, vllm_options: dict | None):
        from posttrain.generation.backend import open_backend

        self.model = rebuild_model(spec).to(role_device())
        self.backend = open_backend(kind, self.model, tokenizer, max_batch_size=max_batch_size, seed=seed,
                                    vllm_options=vllm_options, purpose="rollouts")
        self.name = self.backend.name
        self.version = 0  # how many of the trainer's weight updates this copy holds

    def generate(self, prompts, params):
        """The completions, and the version of the weights they were sampled on."""
        return self.backend.generate(prompts, params), self.version

    def load(self, trainable: dict, version: int) -> None:
        with torch.no_grad():
            own = dict(self.model.named_parameters())
            for name, tensor in trainable.items():
                own[name].copy_(tensor)  # to the role's device
        self.backend.update_weights()
        self.version = version

    def join_weight_group(self, host: str, port: int) -> None:
        from posttrain.train.rl.weight_sync import WeightGroup, join_store

        self.weights = WeightGroup(join_store(host, port), 1)

    def receive_weights(self, layout: list, version: int) -> None:
        own = dict(self.model.named_parameters())
        self.weights.receive([(name, own[name]) for name, _, _ in layout if name in own], layout)
        self.backend.update_weights()
        self.version = version

    def close(self) -> None:
        self.weights = None
        self.backend.close()


class RayRolloutBackend:
    """The generation backend protocol, answered by a RolloutHost in its Ray actor."""

    def __init__(self, session: RaySession, model, tokenizer, *, kind: str, max_batch_size: int, seed: int,
                 vllm_options: dict | None):
        self.model = model
        self.session = session
        self.role = session.host("rollout", RolloutHost, model_spec(model) if session.leads else None, tokenizer, kind,
                                 max_batch_size, seed, vllm_options)
        self.name = f"ray/{self.role.attr('name')}"
        self.weights = None
        # The weight updates so far, counted on every rank (update_weights is collective) and held by the sampler
        # with its weights: each rank's rollouts are checked to come from the weights that rank asked them of.
        self.version = self.reordered = 0
        self.newer_by = 0  # of the last batch collected: how many updates newer its weights were than asked
        if session.weight_sync == "collective" and session.leads:
            from posttrain.train.rl.weight_sync import WeightGroup, open_store

            store, host = open_store()
            joining = self.role.start("join_weight_group", host, store.port)
            self.weights = self.role.alongside(lambda: WeightGroup(store, 0), joining)
            log.info("weights reach the Ray sampler over a gloo group of two")

    def generate(self, prompts, params):
        return self.collect(self.submit(prompts, params))

    def submit(self, prompts, params):
        return self.role.start("generate", prompts, params), self.version

    def collect(self, started):
        handle, asked = started
        outputs, sampled = self.role.wait(handle)
        if sampled != asked and not self.reordered:
            # Ranks sharing the sampler under async_rollouts: this rank's request, sent before the next update, was
            # served after it (Ray orders each caller's tasks, not different callers'). Rare; said once.
            log.warning("rollouts sampled on weights version %d where this rank asked for version %d: the shared "
                        "sampler received another rank's weight update first; the run stays on-policy within "
                        "async_rollouts but no longer repeats bit for bit", sampled, asked)
        self.reordered += sampled != asked
        self.newer_by = sampled - asked
        return outputs

    def update_weights(self) -> None:
        """On every rank: the leading one sends, and no rank samples again before the sampler has the weights."""
        self.version += 1
        if self.session.leads:
            self.send_weights()
        self.session.all_ranks_here()

    def send_weights(self) -> None:
        if self.weights is not None:
            from posttrain.train.rl.weight_sync import layout

            trainable = [(k, v) for k, v in self.model.named_parameters() if v.requires_grad]
            receiving = self.role.start("receive_weights", layout(trainable), self.version)
            self.role.alongside(lambda: self.weights.send([v for _, v in trainable]), receiving)
        else:
            trainable = {k: v.detach().to("cpu") for k, v in self.model.named_parameters() if v.requires_grad}
            self.role.call("load", trainable, self.version)

    def close(self) -> None:
        self.weights = None  # the group and the store's port go with it
        # Ranks sharing the sampler: each one's last sampling ended before the collectives that end a run.
        if self.session.leads:
            self.role.call("close")


class ReferenceHost:
    """The reference model's side: its log-probs of the rollouts, batched as the trainer's own pass does."""

    def __init__(self, path: str, config, pad_id: int, batch_size: int):
        from posttrain.model.loading import load_model
        from posttrain.train.rl.shared_prompt import min_saved_positions

        self.device = role_device()
        self.model = load_model(path, device=self.device, trust_remote_code=config.trust_remote_code,
                                attn_implementation=config.attn_implementation)
        self.model.requires_grad_(False).eval()
        self.config, self.pad_id, self.batch_size = config, pad_id, batch_size
        self.min_saved = min_saved_positions(self.model, self.device)

    def logps(self, rollouts) -> torch.Tensor:
        from posttrain.train.loop import autocast
        from posttrain.train.rl.experience import score_rollouts

        exp = score_rollouts(rollouts, actor=self.model, reference=None, critic=None, pad_id=self.pad_id,
                             device=self.device, batch_size=self.batch_size, temperature=self.config.temperature,
                             need_old=True, precision=lambda: autocast(self.device, self.config),
                             min_saved=self.min_saved)
        return exp.old_logp.cpu()


class RayReference:
    """A reference model in its Ray actor: score_rollouts starts its log-probs first, and they are computed
    while the trainer scores the same rollouts with the actor and the critic."""

    def __init__(self, session: RaySession, path: str, config, pad_id: int, batch_size: int):
        self.role = session.host("reference", ReferenceHost, path, config, pad_id, batch_size)

    def start(self, rollouts):
        return self.role.start("logps", rollouts)

    def finish(self, started) -> torch.Tensor:
        return self.role.wait(started)


def _model_reward(path: str, batch_size: int, trust_remote_code: bool):
    from posttrain.train.rl.rewards import ModelReward

    return ModelReward(path, role_device(), batch_size, trust_remote_code)


class RayReward:
    """The reward model, scoring in its Ray actor."""

    def __init__(self, session: RaySession, path: str, batch_size: int, trust_remote_code: bool):
        self.role = session.host("reward_model", _model_reward, path, batch_size, trust_remote_code)
        self.name = self.role.attr("name")

    def check(self, prompts) -> None:
        self.role.call("check", prompts)

    def __call__(self, batch):
        return self.role.call("__call__", batch)
