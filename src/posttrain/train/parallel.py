"""How a training objective runs over several processes: the one home of DDP, FSDP2 and DeepSpeed ZeRO.

Every stage trains objectives (train/loop.py, the RL update too) through the calls here, one
process or many:

- `prepare(objective, total_steps)`: the objective wrapped for the ranks, with its optimizer and
  scheduler, built after the wrap (FSDP2 and ZeRO replace the parameters they shard);
- `backward(module, batch, scale, sync, ...)`: one micro-batch forward and backward; the gradients
  sync across ranks on an optimizer step's last micro-batch only;
- `step(...)`: clip, step, schedule, clear; the gradient norm before clipping;
- checkpoints: `trainable_state` / `optimizer_state` (whole, unsharded runs) or `engine_writer` /
  `load_shards` (each rank its shards); `full_model_state`: the weights gathered for the final save,
  which is always an ordinary HF folder or PEFT adapter;
- `gathered` / `copy_trainable`: for calls that bypass the wrapped forward (RL scoring and rollouts,
  KTO's whole-step statistic).

The strategies (the keys users write in HF `TrainingArguments`, LLaMA-Factory and TRL):
- one process, or several without `fsdp`/`deepspeed`: plain, or DDP (each rank holds everything);
- `fsdp: full_shard | shard_grad_op | hybrid_shard | no_shard` with `fsdp_config`: torch FSDP2
  (`fully_shard` on each decoder layer, then on the objective); `no_shard` is DDP. Over several processes
  the model loads low-memory (`loads_low_memory`): only rank 0 reads the weights, the others build it on
  the meta device and receive their shards from rank 0 once it is split;
- `deepspeed: ds_config.json`: a DeepSpeed engine, ZeRO stage 0-3, with the run's own optimizer.

Loss sums are scaled by world / (units of the whole optimizer step): each engine averages gradients
over ranks, which that turns into the sum the loop's divisor expects.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from posttrain.errors import ConfigError, PosttrainError
from posttrain.train import distributed as dist

log = logging.getLogger(__name__)

SHARDED_FOLDERS = ("fsdp", "deepspeed")  # where each rank's shards go inside checkpoint-N, by strategy
ENGINE_TAG = "state"  # DeepSpeed's checkpoint tag
FSDP_STRATEGIES = ("full_shard", "shard_grad_op", "hybrid_shard", "no_shard")
FSDP_WORDS = ("offload", "auto_wrap")  # HF also accepts these after the strategy: "full_shard auto_wrap offload"
FSDP_CONFIG_KEYS = {"cpu_offload": bool, "offload_params": bool, "reshard_after_forward": bool,
                    "activation_checkpointing": bool, "transformer_layer_cls_to_wrap": (list, str),
                    "fsdp_version": int}


@dataclass
class FSDPSettings:
    strategy: str
    cpu_offload: bool = False
    reshard_after_forward: bool = True
    activation_checkpointing: bool = False
    wrap: list[str] = field(default_factory=list)  # decoder layer class names; empty: the model's own


def parse_fsdp(value: str | None, options: dict | None) -> FSDPSettings | None:
    """`fsdp` and `fsdp_config` as HF `TrainingArguments` reads them, checked; None when not set."""
    if not value:
        if options:
            raise ConfigError("fsdp_config is set but fsdp is not; add fsdp: full_shard (or shard_grad_op, "
                              "hybrid_shard, no_shard), or remove fsdp_config")
        return None
    words = value.split() if isinstance(value, str) else list(value)
    strategy, extra = words[0], words[1:]
    if strategy not in FSDP_STRATEGIES:
        raise ConfigError(f"fsdp: {strategy!r} is not a sharding strategy; use one of {', '.join(FSDP_STRATEGIES)}")
    unknown = [w for w in extra if w not in FSDP_WORDS]
    if unknown:
        raise ConfigError(f"fsdp: {unknown[0]!r} is not understood; after the strategy only "
                          f"{' and '.join(FSDP_WORDS)} may follow (e.g. fsdp: full_shard offload)")
    settings = FSDPSettings(strategy, cpu_offload="offload" in extra,
                            reshard_after_forward=strategy != "shard_grad_op")
    for raw_key, v in (options or {}).items():
        key = raw_key[len("fsdp_"):] if raw_key.startswith("fsdp_") and raw_key != "fsdp_version" else raw_key
        if key not in FSDP_CONFIG_KEYS:
            raise ConfigError(f"fsdp_config: {raw_key!r} is not a key posttrain honours; it reads "
                              f"{', '.join(FSDP_CONFIG_KEYS)}")
        if not isinstance(v, FSDP_CONFIG_KEYS[key]):
            raise ConfigError(f"fsdp_config: {raw_key} must be a {FSDP_CONFIG_KEYS[key]}, got {v!r}")
        if key == "fsdp_version" and v != 2:
            raise ConfigError(f"fsdp_config: fsdp_version {v} is not supported; posttrain shards with FSDP2 "
                              "(torch fully_shard): set fsdp_version: 2 or leave it out")
        if key in ("cpu_offload", "offload_params"):
            settings.cpu_offload = v
        elif key == "transformer_layer_cls_to_wrap":
            settings.wrap = [v] if isinstance(v, str) else list(v)
        elif key != "fsdp_version":
            setattr(settings, key, v)
    if strategy == "no_shard" and settings.cpu_offload:
        raise ConfigError("fsdp: no_shard keeps the whole model on every rank, so there is nothing to offload; "
                          "use fsdp: full_shard offload (or shard_grad_op) to offload parameters")
    return settings


def read_deepspeed_config(path: str | None) -> dict | None:
    """The DeepSpeed config file, read and its ZeRO section checked against DeepSpeed's own schema
    (an unknown or misspelled key is refused there), before anything loads."""
    if not path:
        return None
    file = Path(path)
    try:
        config = json.loads(file.read_text())
    except FileNotFoundError:
        raise ConfigError(f"deepspeed: {path} does not exist; name a DeepSpeed JSON config "
                          "(e.g. LLaMA-Factory's examples/deepspeed/ds_z3_config.json)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"deepspeed: {path} is not readable JSON ({err})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"deepspeed: {path} must hold a JSON object, not {type(config).__name__}")
    zero = config.get("zero_optimization", {})
    try:
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    except ImportError:
        raise ConfigError("deepspeed is set but DeepSpeed is not installed; pip install 'posttrain[scale]' "
                          "(or pip install deepspeed)") from None
    from pydantic import ValidationError
    try:
        checked = DeepSpeedZeroConfig(**zero)
    except (ValidationError, TypeError) as err:
        first = err.errors()[0] if isinstance(err, ValidationError) else {"loc": (), "msg": str(err)}
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"deepspeed: {path}: zero_optimization{'.' + where if where else ''}: {first['msg']}"
                          ) from None
    if checked.stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed: {path}: zero_optimization.stage must be 0, 1, 2 or 3, got {checked.stage}")
    return config


def check_parallel(args) -> None:
    """The sharding keys agree with each other and with the rest of the config (before anything loads)."""
    fsdp = parse_fsdp(getattr(args, "fsdp", None), getattr(args, "fsdp_config", None))
    ds = read_deepspeed_config(getattr(args, "deepspeed", None))
    if fsdp and ds is not None:
        raise ConfigError("fsdp and deepspeed are both set; choose one way to shard (FSDP2 or DeepSpeed ZeRO)")
    if (fsdp or ds is not None) and getattr(args, "quantization_bit", None):
        raise ConfigError("quantization_bit (QLoRA) cannot be sharded here; train QLoRA without fsdp/deepspeed")
    if (fsdp or ds is not None) and getattr(args, "pissa_init", False):
        raise ConfigError("pissa_init cannot be combined with fsdp/deepspeed yet (its final conversion needs the "
                          "whole adapter in one process); use plain LoRA init or train without sharding")
    if fsdp and getattr(args, "finetuning_type", None) in ("ptuning", "prompt_tuning", "prefix_tuning"):
        # The final gather meets PEFT's virtual-token embedding beside a sharded base (embedding of mixed
        # DTensor and Tensor): refused before loading rather than failing at the end of the run.
        raise ConfigError(f"finetuning_type {args.finetuning_type} cannot be sharded with fsdp yet; train it with "
                          "deepspeed or plain DDP (its trained part is small: sharding saves little)")
    if ds is not None:
        _fill_auto(ds, args, check_only=True)


def _fill_auto(ds: dict, args, check_only: bool = False) -> dict:
    """DeepSpeed's "auto" values from the run's own keys, as transformers fills them; a value that
    contradicts the run's keys is refused (DeepSpeed would otherwise train with a different batch)."""
    world = dist.world_size()
    micro, accum = args.per_device_train_batch_size, args.gradient_accumulation_steps
    want = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accum,
            "train_batch_size": micro * accum * world, "gradient_clipping": args.max_grad_norm}
    out = json.loads(json.dumps(ds))
    for key, value in want.items():
        given = out.get(key, "auto")
        if given == "auto":
            out[key] = value
        elif key != "gradient_clipping" and given != value and not check_only:
            raise ConfigError(f"deepspeed: {key} is {given} in the DeepSpeed config but the run's keys make it "
                              f"{value}; set it to \"auto\" or match per_device_train_batch_size, "
                              "gradient_accumulation_steps and the process count")
    for section, enabled in (("bf16", args.bf16), ("fp16", args.fp16)):
        part = out.get(section)
        if isinstance(part, dict) and part.get("enabled") == "auto":
            part["enabled"] = enabled
    if out.get("fp16", {}).get("enabled") and not args.fp16 or out.get("bf16", {}).get("enabled") and not args.bf16:
        if not check_only:
            raise ConfigError("deepspeed: the DeepSpeed config enables bf16/fp16 but the run's bf16/fp16 keys do not; "
                              "set them the same way (or \"enabled\": \"auto\")")
    zero = out.setdefault("zero_optimization", {})
    for key, value in list(zero.items()):
        if value == "auto":  # sizes transformers derives from the hidden size; DeepSpeed's defaults serve here
            del zero[key]
    if "optimizer" in out or "scheduler" in out:
        if not check_only:
            log.warning("deepspeed: the config's optimizer/scheduler sections are ignored: posttrain builds AdamW "
                        "and the schedule from learning_rate, weight_decay, adam_* and lr_scheduler_type")
        out.pop("optimizer", None)
        out.pop("scheduler", None)
    # posttrain sums each step's micro-batch losses itself and calls step() once per optimizer step.
    out["managed_gradient_accumulation"] = False
    out.setdefault("steps_per_print", 10 ** 9)
    out.setdefault("wall_clock_breakdown", False)
    return out


def loads_low_memory(args) -> bool:
    """Whether the model a stage trains loads low-memory, as torchtune and TRL's `fsdp_cpu_ram_efficient_loading`
    do: under FSDP2 over several processes only rank 0 reads the weights, the other ranks build the model on the
    meta device, and `Parallel.prepare` broadcasts rank 0's weights into every rank's shards once `fully_shard`
    has split the model, so no rank but the first ever holds the whole model."""
    fsdp = parse_fsdp(getattr(args, "fsdp", None), getattr(args, "fsdp_config", None))
    world = dist.world_size()
    return world > 1 and not getattr(args, "deepspeed", None) and strategy_kind(fsdp, None, world) == "fsdp"


def deepspeed_zero_stage(args) -> int:
    """The ZeRO stage of the run's DeepSpeed config (checked already), or -1 without DeepSpeed."""
    config = read_deepspeed_config(getattr(args, "deepspeed", None))
    return -1 if config is None else zero_stage(config)


def _dcp_state(module: nn.Module, optimizer) -> dict:
    """What torch.distributed.checkpoint saves for one objective: its trainable weights and own statistics
    (frozen base weights come back from the model files) and its optimizer, each rank its shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(ignore_frozen_params=True)
    return {"model": get_model_state_dict(module, options=options),
            "optim": get_optimizer_state_dict(module, optimizer, options=options)}


def deepspeed_half(ds_config: dict, args) -> bool:
    """Whether DeepSpeed holds the module in bf16/fp16: its config enables either ("auto" from the run's keys)."""
    filled = _fill_auto(ds_config, args, check_only=True)
    return any(isinstance(filled.get(k), dict) and filled[k].get("enabled") is True for k in ("bf16", "fp16"))


def decoder_layers(model: nn.Module, names: list[str]) -> list[nn.Module]:
    """The modules FSDP2 shards one by one: each decoder layer (the classes in `names`, or the classes
    the HF model lists in `_no_split_modules`, as accelerate's transformer wrap policy does)."""
    if not names:
        for m in model.modules():
            names = list(getattr(m, "_no_split_modules", None) or [])
            if names:
                break
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ConfigError(f"fsdp: no decoder layer of class {names or '(none listed by the model)'} found in "
                          f"{type(model).__name__}; set fsdp_config.transformer_layer_cls_to_wrap to its layer class")
    return layers


def strategy_kind(fsdp: FSDPSettings | None, ds_config: dict | None, world: int) -> str:
    """single | ddp | fsdp | deepspeed: how a run with these keys trains on `world` processes (`fsdp: no_shard`
    is DDP; FSDP2 in one process only where it offloads)."""
    if ds_config is not None:
        return "deepspeed"
    if fsdp and fsdp.strategy != "no_shard" and (world > 1 or fsdp.cpu_offload):
        return "fsdp"
    return "ddp" if world > 1 else "single"


def zero_stage(ds_config: dict | None) -> int:
    return int((ds_config or {}).get("zero_optimization", {}).get("stage", 0))


def describe(kind: str, world: int, fsdp: FSDPSettings | None = None, ds_config: dict | None = None) -> str:
    """The strategy in words, as the plan and the run's log show it."""
    if kind == "fsdp":
        return (f"FSDP2 {fsdp.strategy} over {world} processes"
                + (", parameters offloaded to CPU" if fsdp.cpu_offload else ""))
    if kind == "deepspeed":
        return f"DeepSpeed ZeRO-{zero_stage(ds_config)} over {world} processes"
    return f"DDP over {world} processes" if kind == "ddp" else "one process"


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter (FSDP2's DTensor shard, ZeRO-3's partition), or the tensor itself."""
    if hasattr(t, "ds_tensor"):
        return t.ds_tensor
    return t.to_local() if hasattr(t, "to_local") else t


def _any_rank_on_meta(module: nn.Module) -> bool:
    """Whether some rank built `module` on the meta device (the low-memory load); rank 0 never does."""
    mine = any(t.is_meta for t in [*module.parameters(), *module.buffers()])
    if mine and dist.is_main():
        raise PosttrainError("fsdp: rank 0 holds meta-device weights it has no values for; it must load the model "
                             "whole (report this: a loader built rank 0's model on the meta device)")
    return dist.all_reduce_sum(torch.tensor([float(mine)])).item() > 0


def _state_once(module: nn.Module) -> dict[str, torch.Tensor]:
    """`module`'s state dict with a module shared under two names (PEFT prompt learning's `word_embeddings` is the
    base's embedding) under its first name only, as torch.distributed.checkpoint loads state into it."""
    once = set()
    for prefix, m in module.named_modules():  # each module once, first name first
        dot = f"{prefix}." if prefix else ""
        once |= {dot + name for name, _ in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]}
    return {k: v for k, v in module.state_dict().items() if k in once}


def _on_host(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` in host memory, tensors that share storage (a tied head) still sharing it; CPU tensors as they are."""
    moved: dict[int, torch.Tensor] = {}
    out = {}
    for key, t in state.items():
        if t.device.type == "cpu":
            out[key] = t
        else:
            out[key] = moved.get(t.data_ptr())
            if out[key] is None:
                out[key] = moved[t.data_ptr()] = t.detach().to("cpu")
    return out


def _real_bytes(module: nn.Module, *more: dict) -> int:
    """Bytes of the weights and buffers this rank holds in memory (its shards when sharded; meta tensors hold
    none), counting each storage once, and those of the state dicts in `more` it still keeps."""
    tensors = [local(t) for t in [*module.parameters(), *module.buffers()]]
    tensors += [local(t) for d in more for t in d.values() if torch.is_tensor(t)]
    storages = {}
    for t in tensors:
        if not t.is_meta:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


class Parallel:
    """The run's strategy, chosen from its config and the process count."""

    def __init__(self, args, device: torch.device):
        self.args, self.device = args, device
        self.world = dist.world_size()
        self.fsdp = parse_fsdp(getattr(args, "fsdp", None), getattr(args, "fsdp_config", None))
        self.ds_config = read_deepspeed_config(getattr(args, "deepspeed", None))
        self.kind = strategy_kind(self.fsdp, self.ds_config, self.world)
        self.load_bytes: list[int] = []  # FSDP2: the most weight bytes each rank held while loading and sharding
        if self.fsdp and self.fsdp.strategy == "no_shard":
            self.fsdp = None  # every rank keeps everything: DDP
        if self.fsdp and self.kind == "single":
            log.info("fsdp: one process has nothing to shard with; training unsharded")

    @property
    def sharded(self) -> bool:
        return self.kind in ("fsdp", "deepspeed")

    # -- wrap ------------------------------------------------------------------------------------
    def prepare(self, objective: nn.Module, total_steps: int, optimizer_args=None):
        """(module to run, optimizer, scheduler) for `objective`; `optimizer_args` (default the run's args)
        carries the learning rate (the RL critic has its own)."""
        from posttrain.train.loop import build_optimizer, build_scheduler

        opt_args = optimizer_args or self.args
        if self.kind == "deepspeed":
            return self._deepspeed(objective, total_steps, opt_args)
        if self.kind == "fsdp":
            self._shard(objective)
            module = objective
        elif self.kind == "ddp":
            ids = [self.device.index] if self.device.type == "cuda" else None
            module = nn.parallel.DistributedDataParallel(objective, device_ids=ids)
        else:
            module = objective
        optimizer = build_optimizer(objective, opt_args)
        return module, optimizer, build_scheduler(optimizer, opt_args, total_steps)

    def _shard(self, objective: nn.Module) -> None:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        s = self.fsdp
        options = {"reshard_after_forward": s.reshard_after_forward}
        if s.strategy == "hybrid_shard":  # replicate across nodes, shard within one
            from torch.distributed.device_mesh import init_device_mesh

            per_node = int(os.environ.get("LOCAL_WORLD_SIZE", self.world))
            options["mesh"] = init_device_mesh(self.device.type, (self.world // per_node, per_node),
                                               mesh_dim_names=("replicate", "shard"))
        if self.args.bf16:  # weights gathered and computed in bf16, gradients reduced in fp32
            options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if s.cpu_offload:  # pinned memory needs an accelerator
            options["offload_policy"] = CPUOffloadPolicy(pin_memory=self.device.type == "cuda")
        on_meta = _any_rank_on_meta(objective)
        # Low-memory load (`loads_low_memory`): rank 0 keeps its whole weights alive past the split, to broadcast them,
        # in host memory (on a GPU its device then holds the whole model no longer than before).
        whole = _on_host(_state_once(objective)) if on_meta and dist.is_main() else {}
        held = [_real_bytes(objective)]
        for layer in decoder_layers(objective, s.wrap):
            fully_shard(layer, **options)
        fully_shard(objective, **options)
        if on_meta:
            held.append(_real_bytes(objective, whole))
            self._fill_from_rank0(objective, whole, torch.device("cpu") if s.cpu_offload else self.device)
            whole.clear()
        held.append(_real_bytes(objective))
        # Measured, not assumed: the most weight bytes each rank held at once while loading and sharding.
        self.load_bytes = [int(b) for b in dist.all_gather_floats(max(held))]

    def _fill_from_rank0(self, objective: nn.Module, whole: dict, device: torch.device) -> None:
        """Rank 0's weights (`whole`, its state dict before sharding) broadcast into every rank's shards; the ranks
        that built the model on the meta device first give their shards and buffers real, empty storage. Buffers
        outside the state dict (rotary `inv_freq`) are broadcast whole: a model may compute them in ways a rebuilt
        module would not repeat (rope scaling), and they are small."""
        import torch.distributed as torch_dist
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        if not dist.is_main():
            objective.to_empty(device=device)
        # Fresh weights (a new LoRA, a reward head, soft prompts) are rank 0's too: every rank starts the same.
        # strict=False: a module shared under two names is loaded under its first (`_state_once`); the key sets are the
        # same on every rank (stage_steps.load_low_memory compared the structures).
        set_model_state_dict(objective, whole, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                                         strict=False))
        saved = set(objective.state_dict().keys())
        wire = torch.device("cuda", torch.cuda.current_device()) if torch_dist.get_backend() == "nccl" else \
            torch.device("cpu")
        with torch.no_grad():
            for name, buffer in objective.named_buffers():
                if name in saved:
                    continue
                sent = buffer.detach().to(wire).contiguous() if dist.is_main() else \
                    torch.empty(buffer.shape, dtype=buffer.dtype, device=wire)
                torch_dist.broadcast(sent, src=0)
                buffer.copy_(sent)

    def _deepspeed(self, objective: nn.Module, total_steps: int, opt_args):
        import deepspeed

        from posttrain.train.loop import build_optimizer, build_scheduler

        config = _fill_auto(self.ds_config, self.args)
        optimizer = build_optimizer(objective, opt_args, fused=False)  # DeepSpeed steps it on flat partitions
        engine, ds_optimizer, _, _ = deepspeed.initialize(model=objective, optimizer=optimizer, config=config,
                                                          dist_init_required=False)
        # The schedule is posttrain's own, on the same parameter groups DeepSpeed's optimizer updates.
        return engine, ds_optimizer, build_scheduler(optimizer, opt_args, total_steps)

    # -- one micro-batch, one step ------------------------------------------------------------------
    def backward(self, module: nn.Module, batch, *, scale: float, sync: bool, scaler, precision) -> dict:
        """One micro-batch through `module` under `precision` and the backward of its loss sum times
        `scale`; gradients sync across ranks only where `sync`. The objective's output, for its metrics."""
        if self.kind == "deepspeed":
            with precision:
                out = module(batch)
            module.backward(out["loss_sum"] * scale, scale_wrt_gas=False)
            return out
        if self.kind == "fsdp":
            module.set_requires_gradient_sync(sync)
            quiet = contextlib.nullcontext()
        else:
            quiet = contextlib.nullcontext() if sync or not hasattr(module, "no_sync") else module.no_sync()
        with quiet:
            with precision:
                out = module(batch)
            scaler.scale(out["loss_sum"] * scale).backward()
        return out

    def step(self, module: nn.Module, model: nn.Module, optimizer, scheduler, scaler, max_grad_norm: float
             ) -> tuple[torch.Tensor | float | None, float]:
        """Unscale (fp16), clip `model`'s gradients to max_grad_norm (when > 0), step the optimizer and
        the scheduler, clear the gradients; (the norm before clipping, or None; the step's lr)."""
        lr = scheduler.get_last_lr()[0]
        if self.kind == "deepspeed":
            module.step()  # clips to gradient_clipping (= max_grad_norm), steps, clears
            scheduler.step()
            norm = module.get_global_grad_norm() if max_grad_norm > 0 else None
            return (float(norm) if norm is not None else None), lr
        scaler.unscale_(optimizer)
        grad_norm = None
        if max_grad_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            if hasattr(grad_norm, "full_tensor"):  # FSDP2: the norm over every rank's shard
                grad_norm = grad_norm.full_tensor()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return grad_norm, lr

    # -- checkpoints and the final save ---------------------------------------------------------------
    # A checkpoint of a sharded run holds each rank's shards, written by every rank into the checkpoint's
    # temporary folder before it is renamed into place: torch.distributed.checkpoint for FSDP2 (under
    # checkpoint-N/fsdp/<name>; it reshards on load, so a run resumes on another number of processes),
    # DeepSpeed's own files for ZeRO (checkpoint-N/deepspeed/<name>). Rank 0 adds the scheduler, RNG and
    # trainer state. Unsharded runs write whole weights and optimizer state as before.

    def trainable_state(self, objective: nn.Module) -> dict[str, torch.Tensor] | None:
        """The trainable parameters and the objective's own statistics as rank 0 writes them into
        model.safetensors; None when sharded (they are in the shards `engine_writer` writes)."""
        if self.sharded:
            return None
        from posttrain.train.checkpoint import own_buffers

        names = {k for k, p in objective.named_parameters() if p.requires_grad} | set(own_buffers(objective))
        return {k: v for k, v in objective.state_dict(keep_vars=True).items() if k in names}

    def optimizer_state(self, module: nn.Module, optimizer) -> dict | None:
        """The optimizer's state as rank 0 writes it into optimizer.pt; None when sharded."""
        return None if self.sharded else optimizer.state_dict()

    def engine_writer(self, parts: dict[str, tuple[nn.Module, torch.optim.Optimizer]]):
        """What every rank writes into a checkpoint's temporary folder for each (wrapped objective, its
        optimizer) in `parts`, or None when unsharded."""
        if not self.sharded:
            return None

        def write(folder: Path) -> None:
            for name, (module, optimizer) in parts.items():
                where = folder / self.kind / name
                if self.kind == "deepspeed":
                    module.save_checkpoint(str(where), tag=ENGINE_TAG, exclude_frozen_parameters=True)
                else:
                    import torch.distributed.checkpoint as dcp

                    dcp.save(_dcp_state(module, optimizer), checkpoint_id=str(where))
        return write

    def load_shards(self, module: nn.Module, optimizer, folder: Path, name: str) -> None:
        """Weights and optimizer state of part `name` from the shards in checkpoint `folder`."""
        kind = next((k for k in SHARDED_FOLDERS if (folder / k).is_dir()), None)
        if kind != self.kind and not (kind == "fsdp" and self.kind in ("single", "ddp")):
            wrote = f"a {kind} run" if kind else "an unsharded run"
            raise ConfigError(f"{folder}: the checkpoint was written by {wrote} and this run is {self.describe()}; "
                              "resume with the sharding it was written with (an FSDP2 checkpoint also resumes "
                              "on another number of processes)")
        where = folder / kind / name
        if not where.is_dir():
            raise ConfigError(f"{folder}: the checkpoint holds no {where.relative_to(folder)}; resume it with the "
                              "same stage and models it was written with")
        if kind == "deepspeed":
            module.load_checkpoint(str(where), tag=ENGINE_TAG, load_module_strict=False,
                                   load_optimizer_states=True, load_lr_scheduler_states=False)
            return
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        target = module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module
        state = _dcp_state(target, optimizer)
        dcp.load(state, checkpoint_id=str(where))
        set_model_state_dict(target, state["model"], options=StateDictOptions(strict=False))
        set_optimizer_state_dict(target, optimizer, state["optim"])

    def load_optimizer_state(self, module: nn.Module, optimizer, state: dict | None, folder: Path | None = None,
                             name: str = "objective") -> None:
        """The optimizer (and, from shards, the weights too) of part `name` from checkpoint `folder`."""
        if state is None:
            self.load_shards(module, optimizer, folder, name)
        elif self.sharded:
            raise ConfigError(f"{folder}: the checkpoint was written by an unsharded run and this run is "
                              f"{self.describe()}; resume with the sharding it was written with")
        else:
            optimizer.load_state_dict(state)

    def load_trainable_state(self, module: nn.Module, weights: dict[str, torch.Tensor]) -> tuple[list, list]:
        """Whole trainable weights (model.safetensors of an unsharded run) into `module`; (missing,
        unexpected) keys as `load_state_dict` reports them."""
        result = module.load_state_dict(weights, strict=False)
        return list(result.missing_keys), list(result.unexpected_keys)

    def _gathered(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """ZeRO-3 parameters gathered whole one at a time; rank 0 keeps CPU copies of the persistent state."""
        import deepspeed

        names = set(module.state_dict().keys())
        out = {}
        for key, p in module.named_parameters():
            if key not in names:
                continue
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None, enabled=hasattr(p, "ds_id")):
                if dist.is_main():
                    out[key] = p.detach().to("cpu", copy=True)
        if dist.is_main():
            out.update({k: b.detach().cpu() for k, b in module.named_buffers() if k in names})
        return out

    def full_model_state(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """`model`'s whole state dict on rank 0 for the final save (collective), or None when the model is
        not sharded (then it saves itself)."""
        if self.kind == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.kind == "deepspeed" and self.zero_stage == 3:
            return self._gathered(model)
        return None

    @property
    def zero_stage(self) -> int:
        return zero_stage(self.ds_config)

    # -- calls that bypass the wrapped forward (RL scoring and rollouts) -------------------------------
    @contextlib.contextmanager
    def gathered(self, objective: nn.Module | None):
        """The objective's own parameters whole for calls into its model that bypass its forward (FSDP2
        gathers the root's parameters only in the root's forward; each layer gathers its own in its own)."""
        if self.kind != "fsdp" or objective is None:
            yield
            return
        # The objective must be set up as the root before any layer runs alone (else a layer takes the root's
        # role); its forward does that on first use, which may not have come yet (the critic is scored first).
        objective._get_fsdp_state()._lazy_init()
        objective.unshard()
        try:
            yield
        finally:
            objective.reshard()

    def copy_trainable(self, source: nn.Module, into: nn.Module) -> None:
        """`source`'s trainable weights, gathered whole on every rank, copied in place into `into`, a plain
        model of the same layout (the RL rollout copy, whose tensors the engine holds)."""
        if self.kind == "deepspeed":  # ZeRO-3 gathers each parameter in turn; ZeRO 0-2 keep them whole
            import deepspeed

            params = dict(into.named_parameters())
            with torch.no_grad():
                for key, p in source.named_parameters():
                    if p.requires_grad and key in params:
                        with deepspeed.zero.GatheredParameters([p], enabled=hasattr(p, "ds_id")):
                            params[key].copy_(p)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        whole = get_model_state_dict(source, options=StateDictOptions(full_state_dict=True, ignore_frozen_params=True))
        params = dict(into.named_parameters())
        with torch.no_grad():
            for key, value in whole.items():
                if key in params:  # a tied head is the embedding's parameter, listed once
                    params[key].copy_(value)

    # -- what the plan and the log show --------------------------------------------------------------
    def describe(self) -> str:
        return describe(self.kind, self.world, self.fsdp, self.ds_config)


def local_numel(module: nn.Module) -> int:
    """Parameters this rank holds (its shards under FSDP2 and ZeRO-3), for checking that sharding shards."""
    return sum(local(p).numel() for p in module.parameters())

