"""Which parameters train: `finetuning_type` applied to a loaded model, and adapters loaded back.

full      every parameter
freeze    the last (or first) N decoder layers, optionally only some modules in them
lora      a LoRA-family adapter (DoRA, rsLoRA, PiSSA init, LoRA+ learning rates), via PEFT
qlora     LoRA over a 4/8-bit base (bitsandbytes, CUDA only)
ptuning / prompt_tuning / prefix_tuning   trained virtual tokens, via PEFT

Everything PEFT-based is saved in PEFT's own format (adapter_config.json +
adapter_model.safetensors), so `peft.PeftModel.from_pretrained`, vLLM and `posttrain serve` load
it unchanged. Every check here runs before the first training step.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from posttrain.errors import ConfigError
from posttrain.model import files
from posttrain.model.loading import check_attn_implementation

log = logging.getLogger(__name__)

PROMPT_LEARNING = ("ptuning", "prompt_tuning", "prefix_tuning")
PEFT_TYPES = ("lora", "qlora") + PROMPT_LEARNING
ADAPTER_CONFIG = "adapter_config.json"
SCALAR_HEADS = ("score", "v_head")  # a reward model's or critic's output layer: trained in full, never adapted


def _as_list(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return list(value)


# -- checks that need no model --------------------------------------------------------------------

def check_finetuning(args, device: torch.device, *, packing: bool = False) -> None:
    """Refuse settings that cannot run here, before anything loads."""
    kind = args.finetuning_type
    bits = getattr(args, "quantization_bit", None)  # rm has no quantized base
    if bits is not None:
        if device.type != "cuda":
            raise ConfigError(f"finetuning_type {kind!r} with quantization_bit={bits} needs a CUDA "
                              "GPU (bitsandbytes quantized layers do not run on CPU); use finetuning_type: lora")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError("quantization_bit needs the bitsandbytes package: `pip install bitsandbytes`")
    if kind in PROMPT_LEARNING and packing:
        raise ConfigError(f"packing: true cannot be used with finetuning_type {kind!r}: its virtual tokens are "
                          "prepended once per row, and a packed row holds several samples; set packing: false")
    if kind == "prefix_tuning" and args.gradient_checkpointing:
        raise ConfigError("prefix_tuning passes its prefixes as a key/value cache, which gradient checkpointing "
                          "drops; set gradient_checkpointing: false")
    if args.adapter_name_or_path and kind not in PEFT_TYPES:
        raise ConfigError(f"adapter_name_or_path is set but finetuning_type is {kind!r}; to keep training an "
                          "adapter use its type (lora, ptuning, ...); to train the merged model in full, "
                          "`posttrain export` it first")
    if args.adapter_name_or_path:
        files.check_adapter_files(args.adapter_name_or_path)
    check_attn_implementation(getattr(args, "attn_implementation", "sdpa"))



# -- applying a finetuning type -------------------------------------------------------------------

def linear_module_names(model: nn.Module) -> list[str]:
    """Short names of every nn.Linear but the output head (what `lora_target: all` means)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = set()
    for full_name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module is not head and full_name.split(".")[-1] not in SCALAR_HEADS:
            names.add(full_name.split(".")[-1])
    return sorted(names)


def resolve_lora_targets(model: nn.Module, target) -> list[str]:
    available = linear_module_names(model)
    wanted = _as_list(target)
    if wanted == ["all"]:
        if not available:
            raise ConfigError("lora_target: all found no linear layers in this model")
        return available
    all_names = {n.split(".")[-1] for n, _ in model.named_modules()}
    missing = [t for t in wanted if t not in all_names]
    if missing:
        raise ConfigError(f"lora_target: {missing} name no module of this model; its linear layers are "
                          f"{available} (or use lora_target: all)")
    return wanted


def _check_modules_exist(model: nn.Module, names: list[str], key: str) -> None:
    all_names = {n.split(".")[-1] for n, _ in model.named_modules()}
    missing = [n for n in names if n not in all_names]
    if missing:
        raise ConfigError(f"{key}: {missing} name no module of this model")


def freeze_selector(args, n_layers: int) -> Callable[[str], bool]:
    """Whether `finetuning_type: freeze` trains the parameter of this name (as `named_parameters()` names it):
    one of the selected decoder layers (all of it, or the modules listed), or an extra module."""
    k = args.freeze_trainable_layers
    if k == 0 or abs(k) > n_layers:
        raise ConfigError(f"freeze_trainable_layers: {k} is out of range for a model with {n_layers} layers "
                          f"(use 1..{n_layers} for the last N, -1..-{n_layers} for the first N)")
    layer_ids = range(n_layers - k, n_layers) if k > 0 else range(-k)
    modules = _as_list(args.freeze_trainable_modules)
    extra = _as_list(args.freeze_extra_modules)
    layer_re = re.compile(r"\.(\d+)\.")

    def trains(name: str) -> bool:
        m = layer_re.search(name)
        in_layer = m is not None and int(m.group(1)) in layer_ids and ".layers." in name
        if in_layer and modules != ["all"]:
            rest = name[m.end():].split(".")[0]
            in_layer = rest in modules
        return in_layer or any(f".{e}." in f".{name}" for e in extra)

    return trains


def apply_freeze(model: nn.Module, args) -> nn.Module:
    """Train only some decoder layers (and extra modules); everything else keeps requires_grad=False."""
    n_layers = getattr(model.config, "num_hidden_layers", None)
    if not n_layers:
        raise ConfigError("finetuning_type: freeze needs a model whose config has num_hidden_layers")
    trains = freeze_selector(args, n_layers)
    modules = _as_list(args.freeze_trainable_modules)
    _check_modules_exist(model, _as_list(args.freeze_extra_modules), "freeze_extra_modules")
    if modules != ["all"]:
        _check_modules_exist(model, modules, "freeze_trainable_modules")
    for name, p in model.named_parameters():
        p.requires_grad_(trains(name))
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("finetuning_type: freeze selected no parameters; check freeze_trainable_modules")
    return model


def _lora_config(model: nn.Module, args, task_type: str = "CAUSAL_LM"):
    from peft import LoraConfig, TaskType

    targets = resolve_lora_targets(model, args.lora_target)
    to_save = _as_list(args.modules_to_save) or None
    if to_save:
        _check_modules_exist(model, to_save, "modules_to_save")
    init = True
    if args.pissa_init:
        init = "pissa" if args.pissa_iter == -1 else f"pissa_niter_{args.pissa_iter}"
    return LoraConfig(task_type=TaskType[task_type], r=args.lora_rank, lora_alpha=args.lora_alpha or 2 * args.lora_rank,
                      lora_dropout=args.lora_dropout, target_modules=targets, modules_to_save=to_save,
                      use_dora=args.use_dora, use_rslora=args.use_rslora, init_lora_weights=init)


def _prompt_config(model: nn.Module, args):
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, TaskType

    hidden = model.config.hidden_size
    kind = args.finetuning_type
    if kind == "ptuning":
        return PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=args.num_virtual_tokens,
                                   encoder_hidden_size=args.encoder_hidden_size or hidden,
                                   encoder_reparameterization_type=args.encoder_reparameterization_type)
    if kind == "prompt_tuning":
        if args.prompt_tuning_init_text:
            return PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=args.num_virtual_tokens,
                                      prompt_tuning_init="TEXT", prompt_tuning_init_text=args.prompt_tuning_init_text,
                                      tokenizer_name_or_path=str(args.model_name_or_path))
        return PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=args.num_virtual_tokens)
    if not hasattr(model, "get_decoder") or getattr(model.config, "is_encoder_decoder", False):
        raise ConfigError(f"prefix_tuning cannot serve a {type(model).__name__}: it needs a decoder-only model "
                          "that accepts past_key_values")
    return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=args.num_virtual_tokens,
                              prefix_projection=args.prefix_projection,
                              encoder_hidden_size=args.encoder_hidden_size or hidden)


def apply_finetuning(model: nn.Module, args, *, task_type: str = "CAUSAL_LM") -> nn.Module:
    """The model ready to train under `args.finetuning_type` (a PeftModel for the PEFT types).

    task_type "SEQ_CLS" is for reward models: PEFT then also trains (and saves) the new `score` head."""
    kind = args.finetuning_type
    if kind == "full":
        return model
    if kind == "freeze":
        return apply_freeze(model, args)
    if args.adapter_name_or_path:
        return load_adapter(model, args.adapter_name_or_path, trainable=True, expect=kind)
    from peft import get_peft_model

    if getattr(args, "quantization_bit", None) is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing)
    config = _lora_config(model, args, task_type) if kind in ("lora", "qlora") else _prompt_config(model, args)
    if getattr(model, "is_activation_checkpointing", getattr(model, "is_gradient_checkpointing", False)):
        model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need a grad path
    try:
        peft_model = get_peft_model(model, config)
    except (ValueError, RuntimeError) as err:
        raise ConfigError(f"finetuning_type {kind!r} cannot be applied to this model: {err}") from None
    return peft_model


def load_adapter(model: nn.Module, path: str | Path, *, trainable: bool = False, expect: str | None = None):
    """`model` with the PEFT adapter at `path`, refusing one made for another base or shape."""
    from peft import PeftModel

    cfg = files.check_adapter_files(path)  # config values and weights, before PEFT reads (or downloads) them
    peft_type = str(cfg["peft_type"]).upper()
    family = ("lora", "qlora") if peft_type == "LORA" else (files.ADAPTER_TYPES[peft_type],)
    if expect and expect not in family:
        raise ConfigError(f"{path}: is a {peft_type} adapter but finetuning_type is {expect!r}")
    hidden = getattr(model.config, "hidden_size", None)
    # Soft prompts live in the embedding space (prefix tuning's token_dim is the key/value width instead).
    if peft_type in ("P_TUNING", "PROMPT_TUNING") and cfg.get("token_dim") not in (None, hidden):
        raise ConfigError(f"{path}: adapter was made for a model with hidden size {cfg.get('token_dim')}, "
                          f"this base has {hidden}")
    if peft_type == "LORA":
        targets = cfg.get("target_modules")
        if isinstance(targets, list):
            names = {n.split(".")[-1] for n, _ in model.named_modules()}
            missing = [t for t in targets if t.split(".")[-1] not in names]
            if missing:
                raise ConfigError(f"{path}: adapter targets modules {missing} that this base model does not have; "
                                  "it was made for another architecture")
    try:
        peft_model = PeftModel.from_pretrained(model, str(path), is_trainable=trainable)
    except RuntimeError as err:  # size mismatch in load_state_dict
        msg = str(err).split("\n")
        detail = next((l.strip() for l in msg if "size mismatch" in l), msg[0])
        raise ConfigError(f"{path}: adapter does not fit this base model ({detail}); "
                          "it was trained on a base with other shapes") from None
    except (ValueError, KeyError) as err:
        raise ConfigError(f"{path}: adapter cannot be applied to this base model: {err}") from None
    return peft_model


# -- reporting and saving ------------------------------------------------------------------------

def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared (tied) tensors counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel()
        if hasattr(p, "quant_state") or p.dtype in (torch.uint8, torch.int8):
            n *= 2  # 4-bit weights pack two values per byte
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def trainable_summary(model: nn.Module) -> dict:
    trainable, total = count_parameters(model)
    return {"trainable_params": trainable, "total_params": total,
            "trainable_percent": round(100.0 * trainable / max(total, 1), 4)}



def model_bytes(folder: str | Path) -> int:
    """Size of the weights in a saved folder (model or adapter), without tokenizer and config files."""
    return sum(f.stat().st_size for f in Path(folder).iterdir()
               if f.is_file() and f.suffix in (".safetensors", ".bin", ".pt"))


def optimizer_groups(model: nn.Module, args) -> list[dict]:
    """AdamW parameter groups: weight decay off for norms/biases; LoRA+ gives B matrices a higher lr."""
    ratio = getattr(args, "loraplus_lr_ratio", None)
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # Norm weights and biases are not decayed (the usual practice; decaying them hurts).
        fast = bool(ratio) and "lora_B" in name
        groups.setdefault((p.ndim >= 2, fast), []).append(p)
    out = []
    for (decay, fast), params in groups.items():
        group = {"params": params, "weight_decay": args.weight_decay if decay else 0.0}
        if fast:
            group["lr"] = args.learning_rate * ratio
        out.append(group)
    return out


def save_trained(model: nn.Module, folder: Path, args, pissa_initial: Path | None = None,
                 state_dict: dict | None = None) -> None:
    """The finished model or adapter into `folder` (PEFT format for adapters); `state_dict`: the model's
    whole weights when they were gathered from shards (the model's own parameters are only this rank's)."""
    weights = {} if state_dict is None else {"state_dict": state_dict}
    from peft import PeftModel

    if isinstance(model, PeftModel):
        if pissa_initial is not None:
            # A PiSSA adapter applies to the residual base; converting it against its initial state
            # gives an ordinary LoRA adapter (rank doubled) for the original base.
            model.save_pretrained(folder, path_initial_model_for_weight_conversion=str(pissa_initial))
        else:
            model.save_pretrained(folder, **weights)
        _set_base_path(folder, args.model_name_or_path)
        return
    if state_dict is not None and getattr(model.config, "tie_word_embeddings", False):
        # Gathered from shards, a tied head is a second copy; the saved model re-ties it from its source.
        tied = getattr(model, "_tied_weights_keys", None) or {}
        weights["state_dict"] = {k: v for k, v in state_dict.items() if k not in tied}
    model.save_pretrained(folder, **weights)


def _set_base_path(folder: Path, base: str) -> None:
    """Record the base so it resolves from any working directory: a local folder as its absolute path, a
    hub-like id as given."""
    cfg_path = folder / ADAPTER_CONFIG
    cfg = json.loads(cfg_path.read_text())
    local = Path(base).expanduser()
    cfg["base_model_name_or_path"] = str(local.resolve()) if local.is_dir() else str(base)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))


def save_pissa_initial(model: nn.Module, output_dir: str | Path) -> Path | None:
    """Before training, keep a PiSSA adapter's initial A/B so the final save can convert it: in
    `output_dir`/.pissa-init-<pid>/pissa_init (PEFT loads it back under its folder's name, which must be a
    plain identifier), where the next run's checkpoint.remove_leftovers finds it if this one is killed."""
    init = getattr(getattr(model, "active_peft_config", None), "init_lora_weights", None)
    if not (isinstance(init, str) and init.startswith("pissa")):
        return None
    holder = Path(output_dir) / f".pissa-init-{os.getpid()}"
    if holder.exists():  # a killed run's, under the same process id
        shutil.rmtree(holder)
    model.save_pretrained(holder / "pissa_init")
    return holder / "pissa_init"


def remove_pissa_initial(folder: Path | None) -> None:
    """The folder `save_pissa_initial` made, removed once the run is over."""
    if folder is not None:
        shutil.rmtree(folder.parent, ignore_errors=True)
