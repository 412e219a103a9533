"""Which adapters exist, where they may come from, and which are resident.

Registering (`add`, any thread) checks everything up front: the name, that the folder lies inside
an operator-allowed root (after resolving `..` and symlinks), and the weights themselves against
the served model (lora.py / prompt_tuning.py), so a bad adapter fails at load, not at first use.
An adapter folder may ship its own tokenizer and chat template; otherwise it uses the base's.
Errors name the adapter and its path as it was given, never the resolved folder: the messages go
back to API clients, who need not learn the server's file layout. Adapters loaded at run time
(through the API) are marked `runtime`, capped in number, and are the only ones the API may unload.

Files change after registration: `read_weights` (any thread; the server calls it when a request
is admitted, off the event loop) reads and checks a LoRA's weights again, so a broken file fails
that one request before it reaches the engine step it would share with others.

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

from posttrain.inference.request_errors import AdapterError, ProtectedAdapter, UnknownModel
from posttrain.inference.lora import LoraBank, LoraWeights, check_base_model, read_adapter_config, read_lora
from posttrain.inference.prompt_tuning import (PREFIX_TYPES, PROMPT_TYPES, PrefixKV, PromptEmbeddings,
                                               read_prefix_adapter, read_prompt_adapter)
from posttrain.inference.weights import ModelDims

log = logging.getLogger(__name__)

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass(eq=False)
class Adapter:
    name: str
    path: Path  # resolved
    kind: str  # "lora", "prompt" (prompt / P-tuning) or "prefix" (prefix tuning)
    tokenizer: object  # the adapter's own, or the base's
    chat_template: str | None  # the adapter's own, or None for the base's
    prompt: PromptEmbeddings | None = None  # prompt / P-tuning adapters only
    prefix: PrefixKV | None = None  # prefix-tuning adapters only
    rank: int = 0  # LoRA only
    end_of_turn: list[int] = field(default_factory=list)  # its chat template's end-of-turn token (a chat stop)
    created: int = field(default_factory=lambda: int(time.time()))
    removed: bool = False
    given: str = ""  # the path as the operator or client wrote it: the only one error messages show
    runtime: bool = False  # loaded through the API (only these may be unloaded through it)

    @property
    def virtual_tokens(self) -> int:
        """Context positions its soft prompt or prefix takes before the prompt (0 for LoRA)."""
        learned = self.prompt or self.prefix
        return learned.num_virtual_tokens if learned is not None else 0


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):  # match() lets "x\n" through ($)
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
    raw = _checked_path(path)
    if ".." in raw.parts:
        raise AdapterError(f"adapter path {str(path)!r} contains '..'; give a path inside an allowed adapter folder")
    candidates = [raw] if raw.is_absolute() else [root / raw for root in roots]
    for candidate in candidates:
        resolved = _resolve(candidate, path)
        if any(resolved.is_relative_to(root) for root in roots):
            if _fs(resolved.is_dir, path):
                return resolved
        elif _fs(candidate.exists, path) or raw.is_absolute():
            raise AdapterError(f"adapter path {str(path)!r} leads outside the allowed adapter folders (through a "
                               "symlink or an absolute path); refusing it")
    raise AdapterError(f"adapter path {str(path)!r} is not a folder inside the allowed adapter folders")


MAX_PATH_CHARS = 4096  # PATH_MAX on Linux; longer paths fail in the OS anyway


def _checked_path(path: str | Path) -> Path:
    """`path` as a Path, refusing what no filesystem call could take (a NUL byte, a path over PATH_MAX)."""
    text = str(path)
    if not text or "\0" in text:
        raise AdapterError(f"adapter path {text!r} is empty or contains a NUL byte; give a folder name")
    if len(text) > MAX_PATH_CHARS:
        raise AdapterError(f"adapter path is {len(text)} characters long; paths may have at most {MAX_PATH_CHARS}")
    return Path(text).expanduser()


def _fs(call, given: str | Path):
    """A filesystem call on a client's path; its OS errors (symlink loops, over-long names) become AdapterError
    naming the path as given, never a 500 or the resolved path."""
    try:
        return call()
    except RuntimeError:  # pathlib's symlink loop (Python < 3.13)
        raise AdapterError(f"adapter path {str(given)!r} is a symlink loop") from None
    except (OSError, ValueError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else type(err).__name__
        raise AdapterError(f"adapter path {str(given)!r} cannot be used: {reason}") from None


def _resolve(path: Path, given: str | Path) -> Path:
    return _fs(path.resolve, given)


def _as_given(message: str, folder: Path, given: str | Path) -> str:
    """An error message with the resolved folder written as the path the caller gave."""
    return message.replace(str(folder), str(given).rstrip("/") or str(given))


class AdapterRegistry:
    def __init__(self, dims: ModelDims, base_config, base_tokenizer, dtype: torch.dtype, device: torch.device,
                 max_loras: int = 8, allowed_roots: list[str | Path] | None = None, base_name: str = "base",
                 max_runtime_adapters: int = 16):
        if max_loras < 1:
            raise AdapterError(f"max_loras must be >= 1, got {max_loras}")
        self.max_runtime_adapters = max_runtime_adapters
        self.dims = dims
        self.base_config = base_config
        self.base_tokenizer = base_tokenizer
        self.dtype, self.device = dtype, device
        self.base_name = base_name
        self.roots = [Path(r).expanduser().resolve() for r in (allowed_roots or [])]
        for root in self.roots:
            if not root.is_dir():
                raise AdapterError(f"adapter folder {root} does not exist")
        # No bank where another engine holds the weights (serve --backend vllm: names and path rules only).
        self.bank = LoraBank(dims, max_loras, dtype, device) if dims is not None else None
        self._lock = threading.RLock()  # guards the name table and the residency table (read by /metrics)
        self._by_name: dict[str, Adapter] = {}
        # engine-thread state: slot of each resident LoRA adapter (LRU order), and pins per adapter
        self._slot: OrderedDict[Adapter, int] = OrderedDict()
        self._pins: dict[Adapter, int] = {}

    # ---- registration (any thread) ----

    def add(self, name: str, path: str | Path, *, trusted: bool = False, replace: bool = False,
            runtime: bool = False) -> Adapter:
        """Check and register an adapter. `trusted` paths (given by the operator on the command line) may lie
        anywhere; all others must resolve inside the allowed roots. `runtime` ones (a client's, through the API)
        count against `max_runtime_adapters`."""
        validate_name(name)
        if name == self.base_name:
            raise AdapterError(f"adapter name {name!r} is the base model's name; choose another")
        folder = _resolve(_checked_path(path), path) if trusted else resolve_inside(path, self.roots)
        if not _fs(folder.is_dir, path):
            raise AdapterError(f"adapter {name!r}: {path} is not a folder")
        with self._lock:
            self._check_room(name, replace, runtime)
        adapter = self._read(name, folder, path)
        adapter.runtime = runtime
        with self._lock:
            self._check_room(name, replace, runtime)  # again: another load may have won the race meanwhile
            old = self._by_name.get(name)
            if old is not None:
                old.removed = True
            self._by_name[name] = adapter
        log.info("adapter %s (%s%s) from %s", name, adapter.kind, f", rank {adapter.rank}" if adapter.rank else "", folder)
        return adapter

    def _check_room(self, name: str, replace: bool, runtime: bool) -> None:
        if name in self._by_name and not replace:
            raise AdapterError(f"an adapter named {name!r} is already loaded; unload it first")
        if runtime and sum(a.runtime for a in self._by_name.values()) >= self.max_runtime_adapters:
            raise AdapterError(f"this server holds at most {self.max_runtime_adapters} adapters loaded at run time; "
                               "unload one first (POST /v1/unload_lora_adapter)")

    def _read(self, name: str, folder: Path, given: str | Path) -> Adapter:
        try:
            adapter = self._read_files(name, folder)
        except Exception as err:  # an error of any kind in a file names the adapter, as the caller wrote it
            raise AdapterError(_as_given(_reason(err, folder), folder, given)) from None
        adapter.given = str(given)
        return adapter

    def _read_files(self, name: str, folder: Path) -> Adapter:
        config = read_adapter_config(folder)
        check_base_model(config, folder, self.base_config)
        tokenizer, template = self._tokenizer_for(folder)
        end_of_turn = self._end_of_turn(folder, tokenizer, template)
        peft_type = config.get("peft_type")
        if peft_type == "LORA":
            weights = read_lora(name, folder, config, self.dims, self.dtype)  # full check now; bank load later
            return Adapter(name, folder, "lora", tokenizer, template, rank=weights.rank, end_of_turn=end_of_turn)
        if peft_type in PROMPT_TYPES:
            prompt = read_prompt_adapter(name, folder, config, self.dims, self.dtype, self.device)
            return Adapter(name, folder, "prompt", tokenizer, template, prompt=prompt, end_of_turn=end_of_turn)
        if peft_type in PREFIX_TYPES:
            prefix = read_prefix_adapter(name, folder, config, self.dims, self.dtype, self.device)
            return Adapter(name, folder, "prefix", tokenizer, template, prefix=prefix, end_of_turn=end_of_turn)
        raise AdapterError(f"{folder}: peft_type {peft_type!r} is not served; the engine serves LORA, "
                           f"{', '.join(PROMPT_TYPES + PREFIX_TYPES)} (merge other adapter types into the base model)")

    def _end_of_turn(self, folder: Path, tokenizer, template: str | None) -> list[int]:
        """The end-of-turn token of the template the adapter's chats render with (its own, else the base's),
        checked to survive its tokenizer."""
        from posttrain.data.chat import resolve_template
        from posttrain.data.templates import check_template_encodes, end_of_turn_ids
        from posttrain.errors import ConfigError

        try:
            source = template or resolve_template(None, self.base_tokenizer)
        except ConfigError:  # neither has one: completions only
            return []
        try:
            check_template_encodes(tokenizer, source, str(folder / "chat_template.jinja") if template else None)
        except ConfigError as err:
            raise AdapterError(f"{folder}: {err}") from None
        return end_of_turn_ids(tokenizer, source)

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

    def remove(self, name: str, *, runtime_only: bool = False) -> Adapter:
        """Unregister `name`; with `runtime_only` (API callers), the operator's adapters are refused."""
        with self._lock:
            adapter = self._by_name.get(name)
            if adapter is None:
                raise UnknownModel(name)
            if runtime_only and not adapter.runtime:
                raise ProtectedAdapter(f"adapter {name!r} was given by the server's operator (--adapter / "
                                       "--adapter-dir); only adapters loaded through /v1/load_lora_adapter can be "
                                       "unloaded through the API")
            del self._by_name[name]
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

    # ---- weights for a request (any thread) ----

    def read_weights(self, adapter: Adapter) -> LoraWeights | None:
        """A LoRA adapter's weights, read and checked now, unless it is resident already (None then, and for
        prompt adapters, whose tensors were read at registration). Raises AdapterError naming the adapter."""
        if adapter.kind != "lora":
            return None
        with self._lock:
            if adapter in self._slot:
                return None
        try:
            return read_lora(adapter.name, adapter.path, read_adapter_config(adapter.path), self.dims, self.dtype)
        except Exception as err:  # its files changed on disk since registration
            # Clients see the path only as a client gave it; the operator's adapters go by their name.
            shown = adapter.given if adapter.runtime else adapter.name
            raise AdapterError(f"adapter {adapter.name!r} cannot be used: "
                               f"{_as_given(_reason(err, adapter.path), adapter.path, shown)}") from None

    # ---- residency (engine thread only) ----

    def acquire(self, adapter: Adapter, weights: LoraWeights | None = None) -> int | None:
        """The bank slot for a LoRA adapter (loading `weights`, or reading them if not given, evicting the LRU
        unpinned one if needed), pinned; 0 for a prompt adapter; None when every slot is pinned (the request
        waits)."""
        if adapter.kind != "lora":
            return 0
        with self._lock:
            return self._acquire(adapter, weights)

    def _acquire(self, adapter: Adapter, weights: LoraWeights | None) -> int | None:
        slot = self._slot.get(adapter)
        if slot is None:
            weights = weights or self.read_weights(adapter)  # before a slot is freed: a bad file evicts nothing
            slot = self._free_slot()
            if slot is None:
                return None
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


def _reason(err: Exception, folder: Path) -> str:
    """An exception while reading `folder` as one line for a user: our own errors as they are, others (a
    ValueError from a non-numeric config value, say) with their type."""
    if isinstance(err, AdapterError):
        return str(err)
    return f"{folder}: cannot read its files ({type(err).__name__}: {err})"
