"""The memory plan: what one rank of a training run holds, in bytes, from its config and the models'
config.json alone (model/shapes.py), checked against the memory there is before anything loads
(`posttrain plan`, and the first lines of every run). A run whose models alone cannot fit (weights,
gradients, optimizer state, copies: arithmetic, whatever the data) is refused, naming the cheapest
setting that would fit: sharding, gradient checkpointing, offload, LoRA, in that order. A run whose
longest micro-batches would not fit (every row cutoff_len tokens) is warned, with the same advice:
its data may be shorter, which is not known before it is read.

P parameters, T of them trained (both counted from config.json), N the processes a shard spans (the
run's processes; hybrid_shard: one node's):

                            weights    gradients   optimizer (AdamW m, v)   also
  one process, DDP          4P         4T          8T                       DDP: 4T reduction buckets
  FSDP2 full_shard, hybrid  4P/N       4T/N        8T/N                     root + 2 decoder layers gathered
  FSDP2 shard_grad_op       4P/N       4T/N        8T/N                     every layer gathered (kept for backward)
  ZeRO-1                    4P         4T          8T/N
  ZeRO-2                    4P         4T/N        8T/N
  ZeRO-3                    4P/N       4T/N        8T/N                     root + 2 decoder layers gathered

Precision, as posttrain trains: weights load in fp32 and bf16/fp16 is autocast, which keeps a half
copy of every weight a matmul used until the backward (2 bytes each; one layer's under gradient
checkpointing). FSDP2 with bf16 keeps fp32 shards and gathers them in bf16 (no autocast copies).
DeepSpeed with bf16/fp16 enabled in its config holds the module in half precision (2P), gradients in
half (2T) and an fp32 master copy (4T) beside AdamW's moments, partitioned as the optimizer is.
QLoRA holds the base's linear weights in 4 (or 8) bits. CPU offload (`fsdp: ... offload`,
DeepSpeed's offload_optimizer / offload_param) moves the sharded parts to host memory.

Activations, per micro-batch of R rows x S tokens (sft, kto: per_device_train_batch_size rows of
cutoff_len; rm, dpo: twice the rows, chosen and rejected in one pass; ppo/grpo: completions of
cutoff_len + max_completion_length; P- and prompt tuning add their virtual tokens). Per token and
decoder layer, what autograd keeps for a Llama-style layer (hidden H, key/value width K, MLP width I):
the two norms' inputs and outputs, the projections' input, q/k/v and the attention output, o_proj's
input, the MLP's input, gate, up, activation and product: 9H + 2K + 4I values, 4 bytes each in fp32;
under autocast the norms' 4H stay fp32 and the rest is half, 26H + 4K + 8I bytes (held to what
transformers' Llama keeps by tests/test_memory_plan.py). With gradient checkpointing: each layer's
input (H values) plus one layer's whole set. Logits: R x S x vocabulary in fp32, once (an upper
bound where only trained positions reach the head). DPO and KTO precompute the reference's log-probs: no second model
trains beside the policy. PPO/GRPO add the reference (none for a LoRA actor: its base with the
adapter disabled), the critic (gae), a reward model, the rollout engine's KV cache (and a LoRA
actor's merged matrices) or what vLLM takes, and, sharded, a whole copy of the actor that rollouts run on.

Every rank loads its models whole (fp32) before sharding them: that is a peak of its own. Under FSDP2 over
several processes (sft, dpo, kto, rm) only rank 0 does and the others hold only their shards; the plan is
per rank, so its loading peak is rank 0's (which, on the host, also keeps that whole copy until its weights
have been broadcast into every rank's shards).

Not counted: the CUDA context and allocator slack, communication buffers, the optimizer step's
temporaries, evaluation and scoring passes. A plan over the budget cannot fit; one under it is
not a promise.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from posttrain.errors import ConfigError
from posttrain.model.shapes import ModelShapes, ShapesUnavailable, Trained, model_shapes, trained_params
from posttrain.train import distributed as dist
from posttrain.train.parallel import (
    deepspeed_half, describe, parse_fsdp, read_deepspeed_config, strategy_kind, zero_stage)

log = logging.getLogger(__name__)

GiB = 2 ** 30
TRAINING_STAGES = ("sft", "rm", "dpo", "kto", "ppo", "grpo")


@dataclass
class Part:
    what: str
    bytes: int
    where: str = "device"  # device | host | disk
    batch: bool = False  # grows with the micro-batch (rows x tokens): activations, logits, the rollout KV cache
    between_batches: bool = False  # held only while no batch is (a sleeping vLLM, awake to sample): the larger counts


@dataclass
class MemoryPlan:
    stage: str
    strategy: str
    world: int
    params: int  # the trained model's parameters (adapter included)
    trainable: int
    parts: list[Part]
    load: int  # device bytes while every model is loaded whole, before sharding
    notes: list[str] = field(default_factory=list)

    def on(self, where: str, with_batch: bool = True) -> int:
        """Bytes per rank in `where`; without the batch: only what the models hold, whatever the data (and what
        takes the batch's place between batches)."""
        here = [p for p in self.parts if p.where == where]
        models = sum(p.bytes for p in here if not p.batch and not p.between_batches)
        between = sum(p.bytes for p in here if p.between_batches)
        return models + (max(between, sum(p.bytes for p in here if p.batch)) if with_batch else between)

    def lines(self) -> list[str]:
        """The plan as a small table (component, bytes per rank, where)."""
        rows = [(p.what, p.bytes, p.where) for p in self.parts]
        rows.append(("total", self.on("device"), "device" + (f", {size(self.on('host'))} host"
                                                             if self.on("host") else "")))
        rows.append(("total without the batch (the models alone)", self.on("device", with_batch=False), "device"))
        if self.load > self.on("device", with_batch=False):
            rows.append(("loading: every model whole, before sharding", self.load, "device"))
        width = max(len(what) for what, _, _ in rows)
        return ([f"memory plan for {self.stage}: {self.params:,} parameters, {self.trainable:,} trained; "
                 f"{self.strategy}", f"  {'component':<{width}}  {'per rank':>10}  where"]
                + [f"  {what:<{width}}  {size(n):>10}  {where}" for what, n, where in rows]
                + [f"  {n}" for n in self.notes])


def size(n: int | float) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


# -- how a rank holds a trained model ----------------------------------------------------------------

@dataclass
class Layout:
    kind: str  # single | ddp | fsdp | deepspeed
    describe: str
    shard: int = 1  # processes a shard spans
    sharded: tuple[str, ...] = ()  # of weights, gradients, optimizer
    places: dict[str, str] = field(default_factory=dict)  # part -> host | disk, when offloaded
    gathered: str = "none"  # none | layers (root + 2 layers) | all
    half: bool = False  # DeepSpeed holds the module itself in bf16/fp16
    gather_bytes: int = 4

    def per_rank(self, nbytes: float, part: str) -> int:
        return math.ceil(nbytes / self.shard) if part in self.sharded else math.ceil(nbytes)

    def where(self, part: str) -> str:
        return self.places.get(part, "device")


def layout(config, ds_config: dict | None, world: int, local_world: int) -> Layout:
    """The run's strategy (train/parallel.py) as what each rank holds."""
    fsdp = parse_fsdp(getattr(config, "fsdp", None), getattr(config, "fsdp_config", None))
    kind = strategy_kind(fsdp, ds_config, world)
    out = Layout(kind, describe(kind, world, fsdp, ds_config))
    if kind == "fsdp":
        out.shard = local_world if fsdp.strategy == "hybrid_shard" else world
        out.sharded = ("weights", "gradients", "optimizer")
        if fsdp.cpu_offload:
            out.places = dict.fromkeys(out.sharded, "host")
        out.gathered = "layers" if fsdp.reshard_after_forward else "all"
        out.gather_bytes = 2 if config.bf16 else 4
    elif kind == "deepspeed":
        stage, zero = zero_stage(ds_config), ds_config.get("zero_optimization", {})
        out.shard = world
        out.sharded = ("optimizer", "gradients", "weights")[:stage]
        out.half = deepspeed_half(ds_config, config)
        out.gather_bytes = 2 if out.half else 4
        out.gathered = "layers" if stage == 3 else "none"
        optimizer_to = str((zero.get("offload_optimizer") or {}).get("device", "none"))
        param_to = str((zero.get("offload_param") or {}).get("device", "none"))
        if optimizer_to in ("cpu", "nvme"):
            out.places["optimizer"] = "host" if optimizer_to == "cpu" else "disk"
            if stage >= 2:  # ZeRO-Offload steps on the host: the fp32 gradient partitions live there
                out.places["gradients"] = "host"
        if param_to in ("cpu", "nvme") and stage == 3:
            out.places["weights"] = "host" if param_to == "cpu" else "disk"
    return out


def _weight_bytes(shapes: ModelShapes, trained: Trained, config, half: bool = False) -> int:
    """The whole model's weights: fp32 as loaded (bf16/fp16 where DeepSpeed casts it), QLoRA's base in 4 or 8 bits."""
    quantized_bytes = 0.5 if getattr(config, "quantization_bit", None) == 4 else 1
    plain = shapes.total + trained.added - trained.quantized
    return (2 if half else 4) * plain + math.ceil(quantized_bytes * trained.quantized)


def _trained_parts(label: str, shapes: ModelShapes, trained: Trained, lay: Layout, config) -> list[Part]:
    """A trained model's weights, gradients and AdamW state on one rank, and what its strategy gathers."""
    total, T = shapes.total + trained.added, trained.trainable
    weight_bytes = _weight_bytes(shapes, trained, config, lay.half)
    dtype = "bf16/fp16" if lay.half else "fp32" if not trained.quantized else f"{getattr(config, 'quantization_bit', None)}-bit base"
    grad_bytes = 2 if lay.half else 4
    parts = [Part(f"{label}weights ({dtype})", lay.per_rank(weight_bytes, "weights"), lay.where("weights")),
             Part(f"{label}gradients", lay.per_rank(grad_bytes * T, "gradients"), lay.where("gradients"))]
    if lay.kind == "ddp":
        parts.append(Part(f"{label}DDP reduction buckets", grad_bytes * T))
    if lay.half:
        parts.append(Part(f"{label}fp32 master weights", lay.per_rank(4 * T, "optimizer"), lay.where("optimizer")))
    parts.append(Part(f"{label}AdamW moments (2 x fp32)", lay.per_rank(8 * T, "optimizer"), lay.where("optimizer")))
    if lay.gathered != "none":
        root = shapes.total - shapes.layers * shapes.layer_numel  # embeddings, final norm, head
        per_layer = (total - root) / max(shapes.layers, 1)
        whole = root + 2 * per_layer if lay.gathered == "layers" else total
        what = "root + 2 layers" if lay.gathered == "layers" else "every layer"
        parts.append(Part(f"{label}gathered for compute ({what})", math.ceil(whole * lay.gather_bytes)))
    return parts


# -- activations ---------------------------------------------------------------------------------------

def _rows_and_tokens(config) -> tuple[int, int]:
    stage, rows = config.stage, config.per_device_train_batch_size
    if stage in ("ppo", "grpo"):
        return rows, config.cutoff_len + config.max_completion_length
    tokens = config.cutoff_len + (getattr(config, "num_virtual_tokens", 0)
                                  if config.finetuning_type in ("ptuning", "prompt_tuning") else 0)
    return (2 * rows if stage in ("rm", "dpo") else rows), tokens


def activation_bytes(shapes: ModelShapes, rows: int, tokens: int, *, half: bool, checkpointing: bool,
                     residual_bytes: int) -> int:
    """What autograd keeps for the backward of one micro-batch through the decoder (see the module docstring)."""
    H, K, I = shapes.hidden, shapes.kv_dim, shapes.intermediate
    per_layer = (26 * H + 4 * K + 8 * I) if half else 4 * (9 * H + 2 * K + 4 * I)
    n = rows * tokens
    if checkpointing:
        return n * (shapes.layers * H * residual_bytes + per_layer)
    return n * shapes.layers * per_layer


def _compute_parts(shapes: ModelShapes, trained: Trained, lay: Layout, config) -> list[Part]:
    rows, tokens = _rows_and_tokens(config)
    computes_in_half = lay.half or (lay.kind == "fsdp" and config.bf16)
    autocast = (config.bf16 or config.fp16) and not computes_in_half
    checkpointing = config.gradient_checkpointing
    parts = []
    if autocast:
        layers = shapes.layer_matmul_numel - trained.quantized
        held = layers / shapes.layers if checkpointing else layers
        parts.append(Part("autocast's half copies of the weights", math.ceil(2 * (held + shapes.head_matmul_numel))))
    act = activation_bytes(shapes, rows, tokens, half=bool(config.bf16 or config.fp16 or lay.half),
                           checkpointing=checkpointing, residual_bytes=2 if computes_in_half else 4)
    how = ", checkpointed" if checkpointing else ""
    parts.append(Part(f"activations ({rows} rows x {tokens} tokens{how})", act, batch=True))
    if shapes.lm_head:
        parts.append(Part("logits (fp32)", rows * tokens * shapes.vocab * 4, batch=True))
    return parts


# -- the plan --------------------------------------------------------------------------------------------

def plan_memory(config, *, world: int = 1, local_world: int | None = None, ds_config: dict | None = None
                ) -> MemoryPlan:
    """Per-rank bytes of a `config` run on `world` processes (`local_world` of them on one node); `ds_config`: the
    DeepSpeed config as read (None: read from config.deepspeed)."""
    if config.stage not in TRAINING_STAGES:
        raise ConfigError(f"no memory plan for {config.stage!r}: it does not train")
    if ds_config is None:
        ds_config = read_deepspeed_config(getattr(config, "deepspeed", None))
    local_world = local_world or world
    trust = config.trust_remote_code
    rm = config.stage == "rm"
    shapes = model_shapes(config.model_name_or_path, score_head=rm, trust_remote_code=trust)
    trained = trained_params(shapes, config, score_head=rm)
    lay = layout(config, ds_config, world, local_world)
    parts = _trained_parts("", shapes, trained, lay, config) + _compute_parts(shapes, trained, lay, config)
    whole = _weight_bytes(shapes, trained, config)
    load, notes = whole, []  # every rank loads its models whole before anything is sharded

    if config.stage in ("dpo", "kto"):
        if config.stage == "kto" or config.pref_loss not in ("simpo", "orpo"):
            notes.append("reference: log-probs computed once before training; no reference model while training")
        if config.ref_model:  # loaded beside the policy for that pass, then freed
            load += 4 * model_shapes(config.ref_model, key="ref_model", trust_remote_code=trust).total
    if rm and config.lm_coefficient:
        head = Part("LM head (lm_coefficient)", 4 * shapes.vocab * shapes.hidden)
        parts.append(head)
        load += head.bytes
    if config.stage in ("ppo", "grpo"):
        rl_parts, rl_load = _rl_parts(config, shapes, trained, lay, whole, notes)
        parts += rl_parts
        load += rl_load
    return MemoryPlan(config.stage, lay.describe, world, shapes.total + trained.added, trained.trainable, parts,
                      load, notes)


def _rl_parts(config, shapes: ModelShapes, trained: Trained, lay: Layout, actor_bytes: int, notes: list[str]
              ) -> tuple[list[Part], int]:
    """What PPO/GRPO hold beside the actor (train/rl/recipe.py and trainer.py), and what they add at load."""
    from posttrain.train.rl.placement import roles_apart, roles_of
    from posttrain.train.rl.rewards import critic_source

    trust, parts, load = config.trust_remote_code, [], 0
    # Left out only where the roles have GPUs of their own: on CPU their actors share this machine's memory.
    apart = roles_apart(config) and config.ray_num_gpus_per_role > 0
    if apart:
        notes.append(f"placement: ray: {', '.join(roles_of(config))} on GPUs of their own, not counted here")
    if config.kl_coef > 0 or config.kl_target:
        if config.finetuning_type == "lora" and not config.ref_model and not config.pissa_init:
            parts.append(Part("reference (the actor's base, adapter disabled)", 0))
        elif not apart:
            ref = model_shapes(config.ref_model or config.model_name_or_path, key="ref_model", trust_remote_code=trust)
            parts.append(Part("reference model (fp32, whole)", 4 * ref.total))
            load += 4 * ref.total
    if config.advantage_estimator == "gae":
        critic = model_shapes(critic_source(config), score_head=True, key="critic_model", trust_remote_code=trust)
        parts += _trained_parts("critic ", critic, Trained(0, critic.total, 0, 0), lay, config)
        load += 4 * critic.total
    if config.reward_model and not apart:
        for name, reward in _reward_models(config.reward_model, trust):
            parts.append(Part(f"{name} (fp32, whole)", 4 * reward.total))
            load += 4 * reward.total
    if lay.kind in ("fsdp", "deepspeed"):  # rollouts run on a whole copy, refreshed from the shards each step
        parts.append(Part("rollout copy of the actor (fp32, whole)", actor_bytes))
        load += actor_bytes
    if apart:
        return parts, load
    if _rollouts_on_vllm(config):
        parts += _vllm_parts(config, shapes, notes)
        return parts, load
    from posttrain.inference.weights import SUPPORTED_MODEL_TYPES

    if config.finetuning_type == "lora" and not config.use_dora and shapes.model_type in SUPPORTED_MODEL_TYPES:
        parts.append(Part("rollout engine: merged LoRA matrices", 4 * trained.adapted))
    sequences = config.rollout_batch_size * config.num_generations
    length = config.cutoff_len + config.max_completion_length
    parts.append(Part(f"rollout KV cache ({sequences} x {length} tokens)",
                      sequences * length * shapes.layers * 2 * shapes.kv_dim * 4, batch=True))
    return parts, load


def _on_cuda(config) -> bool:
    return config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())


def _rollouts_on_vllm(config) -> bool:
    """Whether the run's rollouts go to vLLM (auto: on CUDA, where vLLM is installed and samples the actor as
    trained, as generation/backend.py decides)."""
    if config.rollout_backend != "auto":
        return config.rollout_backend == "vllm"
    if config.use_dora or config.pissa_init or config.quantization_bit:
        return False
    from posttrain.generation.vllm_backend import find_vllm_python

    try:
        return _on_cuda(config) and find_vllm_python(config.vllm_python) is not None
    except ConfigError:  # a vllm_python that is not there: the run says so when it starts
        return False


def _vllm_on_gpu(config) -> bool:
    """An RL run whose vLLM takes a share of the trainer's GPU."""
    return config.stage in ("ppo", "grpo") and _on_cuda(config) and _rollouts_on_vllm(config)


def _vllm_parts(config, shapes: ModelShapes, notes: list[str]) -> list[Part]:
    """What vLLM holds beside the trainer, in place of the engine's KV cache. On a GPU: its share of the GPU's
    memory, weights and KV cache together, all the time or (sleep mode) while it samples, when the batch's
    activations are freed. On CPU: its own process on this machine, the model and the KV cache it is given."""
    if not _on_cuda(config):
        from posttrain.generation.vllm_backend import vllm_env

        kv = int(vllm_env()["VLLM_CPU_KVCACHE_SPACE"])
        return [Part(f"vLLM's process: the model (fp32) and a {kv} GiB KV cache", 4 * shapes.total + kv * GiB)]
    share = config.vllm_gpu_memory_utilization
    if torch.cuda.is_available():  # vLLM takes its share of the whole GPU, whatever the budget
        total = torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", 0))).total_memory
    elif config.memory_budget_gb is not None:  # planned away from the GPU: the budget stands for it
        total = config.memory_budget_gb * GiB
    else:
        notes.append(f"vLLM takes {share:g} of the GPU's memory: not counted (no GPU here; memory_budget_gb sets it)")
        return [Part(f"vLLM ({share:g} of the GPU's memory)", 0)]
    if not config.vllm_enable_sleep_mode:
        return [Part(f"vLLM ({share:g} of the GPU: its weights and KV cache)", int(share * total))]
    parts = [Part(f"vLLM while it samples ({share:g} of the GPU; asleep while the actor trains)", int(share * total),
                  between_batches=True)]
    if config.finetuning_type == "lora":  # sleep level 1: the base waits in host memory
        parts.append(Part("vLLM asleep: the base model (fp32)", 4 * shapes.total, where="host"))
    return parts


def _reward_models(folder: str, trust: bool) -> list[tuple[str, ModelShapes]]:
    """What the reward model holds: a `posttrain rm` folder, or a DPO policy and its reference (a LoRA policy's
    reference is its own base, adapter disabled), scored by their implicit reward."""
    from posttrain.model.reward import implicit_reward_settings

    implicit = implicit_reward_settings(folder)
    if implicit is None:
        return [("reward model", model_shapes(folder, score_head=True, key="reward_model", trust_remote_code=trust))]
    reference = model_shapes(implicit["reference"], key="reward_model", trust_remote_code=trust)
    if implicit["adapter_on_reference"]:
        return [("reward model: DPO policy (LoRA) on its reference", reference)]
    policy = folder if (Path(folder).expanduser() / "config.json").is_file() else _adapter_base(folder)
    return [("reward model: DPO policy", model_shapes(policy, key="reward_model", trust_remote_code=trust)),
            ("reward model: its DPO reference", reference)]


def _adapter_base(folder: str) -> str:
    from posttrain.model.files import adapter_base, check_adapter_files

    return adapter_base(folder, check_adapter_files(folder, "reward_model"), "pass a full DPO folder")


# -- what there is, and whether it fits ------------------------------------------------------------------

@dataclass
class Budget:
    device: int | None  # bytes one rank may use on its device; None: unknown
    host: int | None  # host memory one rank may use (its share of the node's); None: unknown
    shared: bool  # CPU training: the device is the host's memory
    source: str


def host_available() -> int | None:
    """Memory the system can still give (psutil, else /proc/meminfo's MemAvailable); None where neither says."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def budget(config, local_world: int, device: torch.device | None = None) -> Budget:
    """`memory_budget_gb` when set, else what this rank's device has free (CPU: its share of the available RAM)."""
    cuda = device.type == "cuda" if device is not None else _on_cuda(config)
    ram = host_available()
    host = ram // local_world if ram is not None else None
    stated = getattr(config, "memory_budget_gb", None)
    if stated is not None:
        b = int(stated * GiB)
        return Budget(b, b if not cuda else host, not cuda, f"memory_budget_gb: {stated:g}")
    if cuda:
        if not torch.cuda.is_available():
            raise ConfigError("device: cuda but no CUDA device is visible here; set memory_budget_gb to plan for one")
        index = device.index if device is not None and device.index is not None else int(
            os.environ.get("LOCAL_RANK", 0))
        free, _ = torch.cuda.mem_get_info(index)
        return Budget(int(free), host, False, f"free on cuda:{index}")
    share = f", shared by {local_world} processes" if local_world > 1 else ""
    return Budget(host, host, True, f"available RAM{share}")


def shortfalls(plan: MemoryPlan, have: Budget, with_batch: bool = True) -> list[str]:
    """What does not fit, one phrase each; empty when the plan fits (or the budget is unknown). `with_batch`: with
    micro-batches as long as they can be (every row cutoff_len tokens); without: the models alone."""
    out = []
    device = plan.on("device", with_batch) + (plan.on("host") if have.shared else 0)
    need = max(device, plan.load)
    if have.device is not None and need > have.device:
        what = ("loading the models whole takes" if plan.load > device else
                f"a micro-batch of {_batch_words(plan)} takes" if with_batch else "the models alone take")
        out.append(f"{what} {size(need)} per rank{'' if have.shared else ' on the device'}, "
                   f"{size(have.device)} there ({have.source})")
    if not have.shared and have.host is not None and plan.on("host") > have.host:
        out.append(f"offloading takes {size(plan.on('host'))} of host memory per rank, {size(have.host)} there")
    return out


def _batch_words(plan: MemoryPlan) -> str:
    first = next((p.what for p in plan.parts if p.what.startswith("activations (")), "activations ()")
    return first[len("activations ("):-1]


@dataclass
class Fix:
    label: str  # what to write, as the user writes it
    keys: dict = field(default_factory=dict)  # config keys it sets
    zero: dict = field(default_factory=dict)  # zero_optimization keys it sets in the DeepSpeed config


def _fixes(config, ds_config: dict | None, world: int) -> list[Fix]:
    """The settings that lower a rank's memory, cheapest first: vLLM asleep while training, sharding, gradient
    checkpointing, offload, LoRA."""
    out = []
    fsdp = parse_fsdp(config.fsdp, config.fsdp_config)
    kind, stage = strategy_kind(fsdp, ds_config, world), zero_stage(ds_config)
    can_fsdp = world > 1 and config.stage != "rm"  # rm refuses sharding
    if kind == "deepspeed" and stage < 3:
        out.append(Fix("zero_optimization.stage: 3 in the DeepSpeed config", zero={"stage": 3}))
    elif kind != "deepspeed" and can_fsdp and (fsdp is None or fsdp.strategy != "full_shard"):
        out.append(Fix("fsdp: full_shard", {"fsdp": "full_shard" + (" offload" if fsdp and fsdp.cpu_offload else "")}))
    if not config.gradient_checkpointing and config.finetuning_type != "prefix_tuning":
        out.append(Fix("gradient_checkpointing: true", {"gradient_checkpointing": True}))
    zero = (ds_config or {}).get("zero_optimization", {})
    if kind == "deepspeed" and stage >= 1 and (zero.get("offload_optimizer") or {}).get("device", "none") == "none":
        out.append(Fix("offload_optimizer (and at ZeRO-3 offload_param) device: cpu in the DeepSpeed config",
                       zero={"offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}}))
    elif kind == "fsdp" and not fsdp.cpu_offload:
        out.append(Fix(f"fsdp: {fsdp.strategy} offload", {"fsdp": f"{fsdp.strategy} offload"}))
    elif kind in ("single", "ddp") and can_fsdp:
        out.append(Fix("fsdp: full_shard offload", {"fsdp": "full_shard offload"}))
    if config.finetuning_type in ("full", "freeze"):
        out.append(Fix("finetuning_type: lora", {"finetuning_type": "lora"}))
    if _vllm_on_gpu(config) and not (config.vllm_enable_sleep_mode or config.async_rollouts):
        out.insert(0, Fix("vllm_enable_sleep_mode: true", {"vllm_enable_sleep_mode": True}))
    return out


def cheapest_fix(config, ds_config: dict | None, world: int, local_world: int, have: Budget, with_batch: bool
                 ) -> tuple[str, MemoryPlan] | None:
    """The first setting whose plan fits `have` (`with_batch`: as `shortfalls`), else the first run of them in order
    that does; None if none does."""
    fixes = _fixes(config, ds_config, world)
    for combo in [[f] for f in fixes] + [fixes[:n] for n in range(2, len(fixes) + 1)]:
        keys = {k: v for f in combo for k, v in f.keys.items()}
        ds = ds_config
        if ds is not None and any(f.zero for f in combo):
            ds = {**ds, "zero_optimization": {**ds.get("zero_optimization", {}),
                                              **{k: v for f in combo for k, v in f.zero.items()}}}
        plan = plan_memory(config.model_copy(update=keys), world=world, local_world=local_world, ds_config=ds)
        if not shortfalls(plan, have, with_batch):
            return " + ".join(f.label for f in combo), plan
    return None


def verdict(config, plan: MemoryPlan, have: Budget, ds_config: dict | None, local_world: int
            ) -> tuple[str | None, str | None]:
    """(refusal, warning), each one line naming what does not fit and the cheapest fix, or None. Refused: the models
    alone do not fit, whatever the data (weights, gradients, optimizer state, copies: exact arithmetic). Warned: the
    longest micro-batches would not (activations assume every row is cutoff_len tokens; shorter data may fit)."""
    for with_batch in (False, True):
        problems = shortfalls(plan, have, with_batch)
        if not problems:
            continue
        fix = cheapest_fix(config, ds_config, plan.world, local_world, have, with_batch)
        big = sorted((p for p in plan.parts if with_batch or not p.batch), key=lambda p: -p.bytes)[:3]
        largest = ", ".join(f"{p.what} {size(p.bytes)}" for p in big)
        if fix:
            label, fixed = fix
            need = max(fixed.on("device", with_batch), fixed.load)
            advice = f"it fits with {label} ({size(need)} per rank)"
        else:
            tried = " + ".join(f.label for f in _fixes(config, ds_config, plan.world)) or "no other setting"
            advice = (f"it does not fit even with {tried}; use more processes, a smaller per_device_train_batch_size "
                      "or cutoff_len, or a smaller model")
            if _vllm_on_gpu(config):
                advice += ", or a lower vllm_gpu_memory_utilization"
        line = f"memory plan: {'; '.join(problems)} (largest: {largest}); {advice}"
        if not with_batch:
            return line, None
        return None, line + " (rows shorter than cutoff_len need less)"
    return None, None


# -- the two entry points ----------------------------------------------------------------------------------

def check_run_memory(config, device: torch.device) -> None:
    """At the start of a run, before anything loads: log the plan, refuse a run whose models cannot fit its budget,
    and warn when its longest micro-batches would not."""
    world = dist.world_size()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    ds_config = read_deepspeed_config(getattr(config, "deepspeed", None))
    try:
        plan = plan_memory(config, world=world, local_world=local_world, ds_config=ds_config)
    except ShapesUnavailable as why:  # an architecture we cannot count is not refused for it
        if dist.is_main():
            log.info("memory plan: not available (%s)", why)
        return
    have = budget(config, local_world, device)
    if config.memory_budget_gb is None:  # every rank decides alike: by the rank with the least
        least = dist.smallest(float("inf") if have.device is None else have.device)
        have.device = None if least == float("inf") else int(least)
        have.host = have.device if have.shared else have.host
    if dist.is_main():
        for line in plan.lines():
            log.info(line)
        log.info("memory: %s per rank (%s)", size(have.device) if have.device is not None else "unknown", have.source)
    refusal, warning = verdict(config, plan, have, ds_config, local_world)
    if refusal:
        raise ConfigError(f"{refusal}. `posttrain plan` with this config shows the whole plan")
    if warning and dist.is_main():
        log.warning(warning)


def print_plan(config, nproc_per_node: int | None = None, nnodes: int = 1) -> None:
    """`posttrain plan`: the table and the verdict; models that cannot fit raise ConfigError (exit 2), batches that
    may not are a warning, as at the start of a run."""
    local_world = nproc_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))
    world = local_world * nnodes
    ds_config = read_deepspeed_config(getattr(config, "deepspeed", None))
    plan = plan_memory(config, world=world, local_world=local_world, ds_config=ds_config)
    have = budget(config, local_world)
    for line in plan.lines():
        print(line)
    print(f"memory: {size(have.device) if have.device is not None else 'unknown'} per rank ({have.source})")
    refusal, warning = verdict(config, plan, have, ds_config, local_world)
    if refusal:
        raise ConfigError(refusal)
    if warning:
        print(f"warning: {warning}")
    shared = plan.on("host") if have.shared else 0
    need = max(plan.on("device", with_batch=not warning) + shared, plan.load)
    print(f"fits{' without the batch' if warning else ''}: {size(need)} per rank"
          + (f" of {size(have.device)}" if have.device is not None else ""))
