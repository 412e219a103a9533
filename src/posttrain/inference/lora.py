"""LoRA adapters for the engine: read and check a PEFT folder; keep many resident; apply per row.

Reading (`read_lora`): every tensor in the file must land on a linear layer of the served model
with the right shape, or the adapter is refused — an adapter for another model is never "loaded
with no effect". Features the engine does not compute (DoRA, LoRA on embeddings, trained biases,
modules_to_save) are refused too, by name. Scaling (alpha / r, or alpha / sqrt(r) with rsLoRA,
alpha_pattern per module) is folded into B once at load.

Serving (`LoraBank`, `RowLora`): the weights of all resident adapters are stacked, per layer and
module, into A [slots, in, r] and B [slots, r, out], slot 0 all zeros (rows without an adapter).
A batch's delta is batched matmuls over the rows' gathered slots — the BGMV idea — so the cost
does not depend on how many different adapters the batch mixes. Different ranks share a stack:
each adapter is zero-padded to the largest resident rank (zero columns add nothing). The A of the
modules reading the same input (q, k, v; gate, up) sit side by side, so one matmul shrinks the
input for all of them; only modules some resident adapter targets are stacked at all.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from posttrain.errors import ConfigError
from posttrain.inference.request_errors import AdapterError
from posttrain.model import files
from posttrain.inference.weights import ModelDims

GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate_up": ("gate_proj", "up_proj"),
          "down": ("down_proj",)}
MODULE_GROUP = {m: (g, j) for g, mods in GROUPS.items() for j, m in enumerate(mods)}
KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_(A|B)\.weight$")


@dataclass
class LoraWeights:
    name: str
    rank: int  # the largest rank of any module
    modules: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]  # (layer, module) -> (A [r,in], B*scale [out,r])

    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.modules.values())


def read_adapter_config(folder: Path) -> dict:
    """The adapter's config, checked as every command checks it (model/files.py)."""
    try:
        return files.read_adapter_config(folder, "adapter")
    except ConfigError as err:
        raise AdapterError(str(err)) from None


def read_adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """The adapter's tensors: safetensors, or a weights-only pickle (never arbitrary objects)."""
    try:
        return files.read_adapter_tensors(folder)
    except ConfigError as err:
        raise AdapterError(str(err)) from None


def check_base_model(config: dict, folder: Path, base_config) -> None:
    """When the adapter names a local base folder, its architecture must be the served one's."""
    named = config.get("base_model_name_or_path")
    if not named:
        return
    base_dir = Path(named).expanduser()
    if not (base_dir / "config.json").is_file():
        return  # a hub id or a folder not on this machine: the module shapes are the check
    try:
        theirs = json.loads((base_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return
    for key in ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "vocab_size"):
        if key in theirs and theirs[key] != getattr(base_config, key, None):
            raise AdapterError(f"{folder}: trained on {named} ({key}={theirs[key]}), but the served model has "
                               f"{key}={getattr(base_config, key, None)}; an adapter only works on its own base model")


def _alpha_for(module_path: str, config: dict) -> float:
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?{pattern}$", module_path):
            return float(alpha)
    return float(config.get("lora_alpha", 8))


def read_lora(name: str, folder: Path, config: dict, dims: ModelDims, dtype: torch.dtype) -> LoraWeights:
    """Read and check a LoRA adapter against the served model's dimensions."""
    refused = []
    if config.get("use_dora"):
        refused.append("DoRA (use_dora)")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        refused.append(f"trained biases (bias={config.get('bias')!r})")
    if config.get("modules_to_save"):
        refused.append(f"modules_to_save={config['modules_to_save']}")
    if config.get("layer_replication"):
        refused.append("layer_replication")
    if config.get("fan_in_fan_out"):
        refused.append("fan_in_fan_out (Conv1D-style weights)")
    if refused:
        raise AdapterError(f"{folder}: the engine serves plain LoRA on linear layers; this adapter uses "
                           f"{', '.join(refused)}. Merge it into the base model instead "
                           "(PeftModel.merge_and_unload) and serve the merged folder")
    tensors = read_adapter_tensors(folder)
    shapes = dims.module_shapes()
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = KEY.search(key)
        if not m or m.group(2) not in shapes:
            raise AdapterError(f"{folder}: tensor {key!r} is not LoRA on a linear layer of a {dims.model_type} "
                               f"decoder ({', '.join(shapes)}); this adapter does not fit the served model")
        layer, module, which = int(m.group(1)), m.group(2), m.group(3)
        if layer >= dims.num_layers:
            raise AdapterError(f"{folder}: {key!r} targets layer {layer}, but the served model has "
                               f"{dims.num_layers} layers; the adapter was trained on a different base model")
        pairs.setdefault((layer, module), {})[which] = tensor
    if not pairs:
        raise AdapterError(f"{folder}: no LoRA weights in the file; the adapter would have no effect")
    modules = {}
    use_rslora = bool(config.get("use_rslora"))
    for (layer, module), ab in sorted(pairs.items()):
        where = f"layers.{layer}.{module}"
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{folder}: {where} has lora_{''.join(ab)} but not both lora_A and lora_B")
        a, b = ab["A"], ab["B"]
        fan_in, fan_out = shapes[module]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != fan_in or b.shape[0] != fan_out or a.shape[0] != b.shape[1]:
            raise AdapterError(f"{folder}: {where} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, but the "
                               f"served model's {module} maps {fan_in} -> {fan_out}; the adapter was trained on a "
                               "different base model")
        rank = a.shape[0]
        alpha = _alpha_for(f"model.layers.{layer}.{'self_attn' if module.endswith(('q_proj', 'k_proj', 'v_proj', 'o_proj')) else 'mlp'}.{module}", config)
        scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        modules[(layer, module)] = (a.to(dtype), (b.float() * scale).to(dtype))
    return LoraWeights(name, max(a.shape[0] for a, _ in modules.values()), modules)


@dataclass
class _GroupStack:
    """One layer's projection group: the targeted modules' A side by side along the rank, a B per module."""

    modules: list[str]  # the group's modules some resident adapter targets, in group order
    a: torch.Tensor  # [slots, in, len(modules) * rank]
    b: list[torch.Tensor]  # per module: [slots, rank, out]


class LoraBank:
    """Stacked weights of the resident LoRA adapters: slot 0 is zeros, adapters use slots 1..capacity."""

    def __init__(self, dims: ModelDims, max_loras: int, dtype: torch.dtype, device: torch.device):
        self.dims = dims
        self.max_loras = max_loras
        self.dtype = dtype
        self.device = device
        self.rank = 0  # every adapter is padded to this rank
        self.slots = 1  # rows in every stack (slot 0 + allocated adapter slots)
        self.stacks: dict[tuple[int, str], _GroupStack] = {}  # (layer, group) -> stack
        self.resident: dict[int, LoraWeights] = {}  # slot -> adapter

    def _relayout(self, rank: int, slots: int, needed: dict[tuple[int, str], set[str]]) -> None:
        """Reallocate for a larger rank / more slots / newly targeted modules, keeping resident weights."""
        shapes = self.dims.module_shapes()
        old_rank = self.rank
        for key in set(needed) | set(self.stacks):
            old = self.stacks.get(key)
            wanted = needed.get(key, set()) | set(old.modules if old else [])
            modules = [m for m in GROUPS[key[1]] if m in wanted]
            fan_in = shapes[modules[0]][0]
            a = torch.zeros(slots, fan_in, len(modules) * rank, dtype=self.dtype, device=self.device)
            b = [torch.zeros(slots, rank, shapes[m][1], dtype=self.dtype, device=self.device) for m in modules]
            if old is not None:
                keep = old.a.shape[0]
                for j_old, m in enumerate(old.modules):
                    j = modules.index(m)
                    a[:keep, :, j * rank:j * rank + old_rank] = old.a[:, :, j_old * old_rank:(j_old + 1) * old_rank]
                    b[j][:keep, :old_rank] = old.b[j_old]
            self.stacks[key] = _GroupStack(modules, a, b)
        self.rank, self.slots = rank, slots

    def load(self, slot: int, adapter: LoraWeights) -> None:
        if not 1 <= slot <= self.max_loras:
            raise ValueError(f"LoRA slot {slot} outside 1..{self.max_loras}")
        needed: dict[tuple[int, str], set[str]] = {}
        for layer, module in adapter.modules:
            needed.setdefault((layer, MODULE_GROUP[module][0]), set()).add(module)
        missing = any(key not in self.stacks or not mods <= set(self.stacks[key].modules) for key, mods in needed.items())
        if adapter.rank > self.rank or slot >= self.slots or missing:
            slots = self.slots
            while slots <= slot:
                slots = min(max(2 * slots, 2), self.max_loras + 1)
            self._relayout(max(self.rank, adapter.rank), slots, needed)
        self.clear(slot)
        rank = self.rank
        for (layer, module), (a, b) in adapter.modules.items():
            stack = self.stacks[(layer, MODULE_GROUP[module][0])]
            j = stack.modules.index(module)
            r = a.shape[0]
            stack.a[slot, :, j * rank:j * rank + r] = a.t().to(self.device)
            stack.b[j][slot, :r] = b.t().to(self.device)
        self.resident[slot] = adapter

    def clear(self, slot: int) -> None:
        if slot < self.slots:
            for stack in self.stacks.values():
                stack.a[slot].zero_()
                for b in stack.b:
                    b[slot].zero_()
        self.resident.pop(slot, None)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in self.stacks.values() for t in (s.a, *s.b))

    def rows(self, slots: torch.Tensor) -> "RowLora | None":
        """The delta provider for a batch whose row i uses adapter slot slots[i] (0 = none)."""
        if not self.stacks or not bool((slots > 0).any()):
            return None
        return RowLora(self, slots)


class RowLora:
    """Per-row LoRA deltas for one forward call (see forward.RowDeltas)."""

    def __init__(self, bank: LoraBank, slots: torch.Tensor):
        self.bank = bank
        self.slots = slots

    def delta(self, layer: int, group: str, x: torch.Tensor) -> list[torch.Tensor | None] | None:
        stack = self.bank.stacks.get((layer, group))
        if stack is None:
            return None
        rank = self.bank.rank
        shrunk = torch.bmm(x, stack.a.index_select(0, self.slots))  # [B,T,in] @ [B,in,n*r]: all modules at once
        mine = {m: torch.bmm(shrunk[..., j * rank:(j + 1) * rank], stack.b[j].index_select(0, self.slots))
                for j, m in enumerate(stack.modules)}  # [B,T,r] @ [B,r,out]
        return [mine.get(m) for m in GROUPS[group]]
