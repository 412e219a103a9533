"""Which adapters exist, where they may come from, and which are resident.

Registering (`add`, any thread) checks everything up front: the name, that the folder lies inside
an operator-allowed root (after resolving `..` and symlinks), and the weights themselves against
the served model (lora.py / prompt_tuning.py), so a bad adapter fails at load, not at first use.
An adapter folder may ship its own tokenizer and chat template; otherwise it uses the base's.

Residency (`acquire` / `release`, engine thread only): at most `max_loras` LoRA adapters sit in
the stacked bank. A request pins its adapter while it runs; when a new adapter needs a slot, the
least recently used unpinned one is evicted, and if every slot is pinned the request waits.
Prompt-based adapters (prompt, P- and prefix tuning) are a few vectors each and stay resident from
registration.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from posttrain.inference.errors import AdapterError, UnknownModel
from posttrain.inference.lora import LoraBank, check_base_model, read_adapter_config, read_lora
from posttrain.inference.prompt_tuning import (PREFIX_TYPES, PROMPT_TYPES, PrefixKV, PromptEmbeddings,
                                               read_prefix_adapter, read_prompt_adapter)
from posttrain.inference.weights import ModelDims

log = logging.getLogger(__name__)

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass(eq=False)
class Adapter:
    name: str
    path: Path
    kind: str  # "lora", "prompt" (prompt / P-tuning) or "prefix" (prefix tuning)
    tokenizer: object  # the adapter's own, or the base's
    chat_template: str | None  # the adapter's own, or None for the base's
    prompt: PromptEmbeddings | None = None  # prompt / P-tuning adapters only
    prefix: PrefixKV | None = None  # prefix-tuning adapters only
    rank: int = 0  # LoRA only
    created: int = field(default_factory=lambda: int(time.time()))
    removed: bool = False


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not ADAPTER_NAME.match(name):
        raise AdapterError(f"adapter name {name!r} is not allowed: use 1-128 characters from letters, digits, "
                           "'.', '_', '-', starting with a letter or digit")
    return name


def resolve_inside(path: str | Path, roots: list[Path]) -> Path:
    """`path` resolved (symlinks followed) and required to lie inside one of `roots`.

    A relative path is taken relative to each root in turn; an absolute one must already point inside
    a root. `..` components are refused outright, even when they would resolve back inside.
    """
    if not roots:
        raise AdapterError("no adapter folders are allowed on this server (start it with --adapter-dir DIR)")
    raw = Path(path)
    if ".." in raw.parts:
        raise AdapterError(f"adapter path {str(path)!r} contains '..'; give a path inside an allowed adapter folder")
    candidates = [raw] if raw.is_absolute() else [root / raw for root in roots]
    for candidate in candidates:
        resolved = candidate.resolve()
        if any(resolved.is_relative_to(root) for root in roots):
            if resolved.is_dir():
                return resolved
        elif candidate.exists() or raw.is_absolute():
            raise AdapterError(f"adapter path {str(path)!r} resolves to {resolved}, outside the allowed adapter "
                               "folders; refusing it")
    raise AdapterError(f"adapter path {str(path)!r} is not a folder inside the allowed adapter folders")


class AdapterRegistry:
    def __init__(self, dims: ModelDims, base_config, base_tokenizer, dtype: torch.dtype, device: torch.device,
                 max_loras: int = 8, allowed_roots: list[str | Path] | None = None, base_name: str = "base"):
        if max_loras < 1:
            raise AdapterError(f"max_loras must be >= 1, got {max_loras}")
        self.dims = dims
        self.base_config = base_config
        self.base_tokenizer = base_tokenizer
        self.dtype, self.device = dtype, device
        self.base_name = base_name
        self.roots = [Path(r).expanduser().resolve() for r in (allowed_roots or [])]
        for root in self.roots:
            if not root.is_dir():
                raise AdapterError(f"adapter folder {root} does not exist")
        self.bank = LoraBank(dims, max_loras, dtype, device)
        self._lock = threading.RLock()  # guards the name table and the residency table (read by /metrics)
        self._by_name: dict[str, Adapter] = {}
        # engine-thread state: slot of each resident LoRA adapter (LRU order), and pins per adapter
        self._slot: OrderedDict[Adapter, int] = OrderedDict()
        self._pins: dict[Adapter, int] = {}

    # ---- registration (any thread) ----

    def add(self, name: str, path: str | Path, *, trusted: bool = False, replace: bool = False) -> Adapter:
        """Check and register an adapter. `trusted` paths (given by the operator on the command line) may lie
        anywhere; all others must resolve inside the allowed roots."""
        validate_name(name)
        if name == self.base_name:
            raise AdapterError(f"adapter name {name!r} is the base model's name; choose another")
        folder = Path(path).expanduser().resolve() if trusted else resolve_inside(path, self.roots)
        if not folder.is_dir():
            raise AdapterError(f"adapter {name!r}: {path} is not a folder")
        with self._lock:
            if name in self._by_name and not replace:
                raise AdapterError(f"an adapter named {name!r} is already loaded; unload it first")
        adapter = self._read(name, folder)
        with self._lock:
            old = self._by_name.get(name)
            if old is not None:
                if not replace:
                    raise AdapterError(f"an adapter named {name!r} is already loaded; unload it first")
                old.removed = True
            self._by_name[name] = adapter
        log.info("adapter %s (%s%s) from %s", name, adapter.kind, f", rank {adapter.rank}" if adapter.rank else "", folder)
        return adapter

    def _read(self, name: str, folder: Path) -> Adapter:
        config = read_adapter_config(folder)
        check_base_model(config, folder, self.base_config)
        tokenizer, template = self._tokenizer_for(folder)
        peft_type = config.get("peft_type")
        if peft_type == "LORA":
            weights = read_lora(name, folder, config, self.dims, self.dtype)  # full check now; bank load later
            return Adapter(name, folder, "lora", tokenizer, template, rank=weights.rank)
        if peft_type in PROMPT_TYPES:
            prompt = read_prompt_adapter(name, folder, config, self.dims, self.dtype, self.device)
            return Adapter(name, folder, "prompt", tokenizer, template, prompt=prompt)
        if peft_type in PREFIX_TYPES:
            prefix = read_prefix_adapter(name, folder, config, self.dims, self.dtype, self.device)
            return Adapter(name, folder, "prefix", tokenizer, template, prefix=prefix)
        raise AdapterError(f"{folder}: peft_type {peft_type!r} is not served; the engine serves LORA, "
                           f"{', '.join(PROMPT_TYPES + PREFIX_TYPES)} (merge other adapter types into the base model)")

    def _tokenizer_for(self, folder: Path):
        template_file = folder / "chat_template.jinja"
        if not any((folder / f).is_file() for f in TOKENIZER_FILES):
            return self.base_tokenizer, template_file.read_text() if template_file.is_file() else None
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except Exception as err:
            raise AdapterError(f"{folder}: ships tokenizer files that cannot be loaded ({err})") from None
        if len(tokenizer) > self.dims.vocab:
            raise AdapterError(f"{folder}: its tokenizer has {len(tokenizer)} tokens but the served model's "
                               f"embedding has {self.dims.vocab} rows; it needs resized embeddings, which a "
                               "LoRA adapter on a shared base cannot have")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        own = getattr(tokenizer, "chat_template", None)
        return tokenizer, own if own else None

    def remove(self, name: str) -> Adapter:
        with self._lock:
            adapter = self._by_name.pop(name, None)
        if adapter is None:
            raise UnknownModel(name)
        adapter.removed = True  # the engine frees its slot once no running request uses it
        return adapter

    def scan(self, root: str | Path) -> list[Adapter]:
        """Register every adapter folder directly inside `root`, named after the folder; skip (loudly) the rest."""
        root_path = Path(root).expanduser().resolve()
        if root_path not in self.roots:
            self.roots.append(root_path)
        added = []
        for sub in sorted(root_path.iterdir()):
            if not (sub / "adapter_config.json").is_file():
                continue
            try:
                added.append(self.add(sub.name, sub.name if sub.is_symlink() else sub))
            except AdapterError as err:
                log.warning("skipping %s: %s", sub, err)
        return added

    def get(self, name: str) -> Adapter:
        with self._lock:
            adapter = self._by_name.get(name)
        if adapter is None:
            raise UnknownModel(name)
        return adapter

    def list(self) -> list[Adapter]:
        with self._lock:
            return list(self._by_name.values())

    # ---- residency (engine thread only) ----

    def acquire(self, adapter: Adapter) -> int | None:
        """The bank slot for a LoRA adapter (loading it, evicting the LRU unpinned one if needed), pinned;
        0 for a prompt adapter; None when every slot is pinned (the request waits)."""
        if adapter.kind != "lora":
            return 0
        with self._lock:
            return self._acquire(adapter)

    def _acquire(self, adapter: Adapter) -> int | None:
        slot = self._slot.get(adapter)
        if slot is None:
            slot = self._free_slot()
            if slot is None:
                return None
            weights = read_lora(adapter.name, adapter.path, read_adapter_config(adapter.path), self.dims, self.dtype)
            self.bank.load(slot, weights)
            self._slot[adapter] = slot
        self._slot.move_to_end(adapter)
        self._pins[adapter] = self._pins.get(adapter, 0) + 1
        return slot

    def release(self, adapter: Adapter) -> None:
        if adapter.kind != "lora":
            return
        with self._lock:
            self._release(adapter)

    def _release(self, adapter: Adapter) -> None:
        self._pins[adapter] -= 1
        if self._pins[adapter] == 0:
            del self._pins[adapter]
            if adapter.removed:
                self.bank.clear(self._slot.pop(adapter))

    def _free_slot(self) -> int | None:
        used = set(self._slot.values())
        for slot in range(1, self.bank.max_loras + 1):
            if slot not in used:
                return slot
        for adapter, slot in self._slot.items():  # least recently used first
            if adapter not in self._pins:
                del self._slot[adapter]
                self.bank.clear(slot)
                return slot
        return None

    def collect(self) -> None:
        """Free the slots of unloaded adapters that no running request still uses."""
        with self._lock:
            for adapter in [a for a in self._slot if a.removed and a not in self._pins]:
                self.bank.clear(self._slot.pop(adapter))

    def resident(self) -> list[str]:
        with self._lock:
            return [a.name for a in self._slot]
