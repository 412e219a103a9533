"""From YAML, `key=value` overrides and --flags to a command's typed config: aliases, one-line errors,
path checks; the command -> config registry."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from posttrain.config.args import DataArgs
from posttrain.config.rl import GRPOConfig, PPOConfig
from posttrain.config.stages import DPOConfig, KTOConfig, RMConfig, SFTConfig
from posttrain.config.tools import ChatConfig, CompareConfig, ExportConfig, ScoreConfig, ServeConfig
from posttrain.errors import ConfigError

# The one alias table: other names users bring from TRL / LLaMA-Factory for the same key, per command.
# Each alias maps straight to the key it means in that command (TRL's `beta` is DPO's pref_beta but
# GRPO's kl_coef), never through another alias.
_COMMON_ALIASES = {"max_length": "cutoff_len", "max_seq_length": "cutoff_len", "lr": "learning_rate",
                   "dataset_path": "dataset", "additional_target": "modules_to_save", "lora_r": "lora_rank"}
_PREFERENCE_ALIASES = {"beta": "pref_beta", "rpo_alpha": "pref_ftx"}
_RL_ALIASES = {"beta": "kl_coef", "max_new_tokens": "max_completion_length", "num_ppo_epochs": "ppo_epochs",
               "epsilon": "cliprange", "epsilon_high": "cliprange_high", "lambd": "lam"}
_MODEL_ALIASES = {"model_name_or_path": "model"}
ALIASES = {
    "sft": _COMMON_ALIASES, "rm": _COMMON_ALIASES,
    "dpo": {**_COMMON_ALIASES, **_PREFERENCE_ALIASES, "loss_type": "pref_loss",
            "label_smoothing": "dpo_label_smoothing"},
    "kto": {**_COMMON_ALIASES, **_PREFERENCE_ALIASES, "desirable_weight": "kto_chosen_weight",
            "undesirable_weight": "kto_rejected_weight"},
    "ppo": {**_COMMON_ALIASES, **_RL_ALIASES}, "grpo": {**_COMMON_ALIASES, **_RL_ALIASES},
    "export": {},
    # serve: the names `vllm serve` gives these keys, and the singular its own repeatable flags use
    "serve": {**_MODEL_ALIASES, "chat_template": "template", "lora_modules": "adapters", "adapter": "adapters",
              "adapter_dir": "adapter_dirs", "api_keys": "api_key", "max_num_seqs": "max_batch_size"},
    "score": {**_MODEL_ALIASES, "dataset": "data", "max_length": "cutoff_len"},
    "chat": {**_MODEL_ALIASES, "adapter_name_or_path": "adapter"},
    "compare": {"model_name_or_path": "base", "dataset": "data", "max_steps": "steps",
                "per_device_train_batch_size": "batch_size"},
}


STAGES: dict[str, type[BaseModel]] = {"sft": SFTConfig, "export": ExportConfig, "rm": RMConfig, "dpo": DPOConfig,
                                      "kto": KTOConfig, "ppo": PPOConfig, "grpo": GRPOConfig}

# The commands that also take each key as a --flag (their options before they took config files:
# `posttrain serve MODEL --port 8001` keeps working), and every command with a config.
FLAG_COMMANDS: dict[str, type[BaseModel]] = {"serve": ServeConfig, "score": ScoreConfig, "chat": ChatConfig,
                                             "compare": CompareConfig}
COMMANDS: dict[str, type[BaseModel]] = {**STAGES, **FLAG_COMMANDS}
_FLAG_NAMES = {"adapters": "--adapter", "adapter_dirs": "--adapter-dir"}  # given once per item


def flag_name(key: str) -> str:
    """The --flag that sets `key`: its name with dashes (singular for the lists given once per item)."""
    return _FLAG_NAMES.get(key, "--" + key.replace("_", "-"))


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`key=value` strings to a nested dict; values are parsed as YAML (`lr=1e-4`, `packing=true`)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r} is not of the form key=value")
        key, raw = pair.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw else None
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(f"override {pair!r}: the value is not valid YAML ({problem}); quote it, e.g. "
                              f"{key}='\"...\"'") from None
        node = out
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {pair!r}: {key!r} is not a key name (use key=value or key.subkey=value)")
        for depth, p in enumerate(parts[:-1]):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {pair!r}: {'.'.join(parts[:depth + 1])!r} is already set to a plain "
                                  "value, so it has no sub-keys; set one or the other")
        node[parts[-1]] = value
    return out


def _apply_aliases(raw: dict[str, Any], command: str) -> dict[str, Any]:
    out = dict(raw)
    for alias, key in ALIASES.get(command, {}).items():
        if alias in out:
            if key in out and out[key] != out[alias]:
                raise ConfigError(f"config sets both {alias!r} and {key!r} (same setting); keep one")
            out[key] = out.pop(alias)
    return out


def _format_error(err: ValidationError, cls: type[BaseModel]) -> str:
    lines = []
    known = list(cls.model_fields)
    for e in err.errors():
        key = ".".join(str(x) for x in e["loc"]) or "(config)"
        if e["type"] == "extra_forbidden":
            elsewhere = [s for s, other in STAGES.items()
                         if other is not cls and str(e["loc"][-1]) in other.model_fields]
            close = difflib.get_close_matches(str(e["loc"][-1]), known, n=1)
            if elsewhere and len(e["loc"]) == 1:
                lines.append(f"config key {key!r} is for {' / '.join(elsewhere)}, not for "
                             f"{_stage_name(cls)}; remove it")
            else:
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                lines.append(f"unknown config key {key!r}{hint}")
        elif e["type"] == "missing":
            lines.append(f"config key {_key_label(cls, key)} is required")
        elif not e["loc"]:  # a check across keys: its message names them
            lines.append(e["msg"].removeprefix("Value error, "))
        else:
            lines.append(f"config key {_key_label(cls, key)}: {e['msg'].removeprefix('Value error, ')} "
                         f"(got {e.get('input')!r})")
    if len(lines) == 1:
        return f"invalid config: {lines[0]}"
    return "invalid config:\n  " + "\n  ".join(lines)


def _key_label(cls: type[BaseModel], key: str) -> str:
    """A key as its user may have typed it: with its --flag, for the commands that take flags."""
    if _stage_name(cls) in FLAG_COMMANDS and key in cls.model_fields:
        return f"{key!r} ({flag_name(key)})"
    return repr(key)


# Keys that name files or folders: checked for what the OS cannot take, before anything opens them.
PATH_KEYS = ("model_name_or_path", "adapter_name_or_path", "output_dir", "export_dir", "template", "ref_model",
             "ref_cache_dir", "reward_model", "critic_model", "resume_from_checkpoint", "deepspeed",
             "model", "adapter", "adapters", "adapter_dirs", "data", "output", "base")
MAX_PATH_BYTES, MAX_NAME_BYTES = 4096, 255


def check_path_value(key: str, value: str) -> None:
    if "\0" in value:
        raise ConfigError(f"{key}: {value!r} contains a NUL byte; no file name can")
    encoded = value.encode("utf-8", "surrogateescape")
    longest = max((len(part) for part in encoded.split(b"/")), default=0)
    if len(encoded) > MAX_PATH_BYTES or longest > MAX_NAME_BYTES:
        raise ConfigError(f"{key}: {value[:60]!r}... is too long for a path ({len(encoded)} bytes, a name of "
                          f"{longest}; the limits are {MAX_PATH_BYTES} and {MAX_NAME_BYTES})")


def _check_paths(config: BaseModel) -> None:
    for key in PATH_KEYS:
        value = getattr(config, key, None)
        for item in value.values() if isinstance(value, dict) else value if isinstance(value, list) else [value]:
            if isinstance(item, str):
                check_path_value(key, item)
    if isinstance(config, DataArgs):
        for which in config.DATASET_KEYS:
            for entry in config.dataset_entries(which):
                check_path_value(which, entry.path)


def _stage_name(cls: type[BaseModel]) -> str:
    return next((s for s, c in COMMANDS.items() if c is cls), cls.__name__)


def build_config(cls: type[BaseModel], raw: dict[str, Any]):
    raw = _apply_aliases(raw, _stage_name(cls))
    # `key: null` for a required key (as `posttrain config` prints one not yet set) is the key not given.
    raw = {k: v for k, v in raw.items() if v is not None or k not in cls.model_fields or
           not cls.model_fields[k].is_required()}
    try:
        config = cls.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err, cls)) from None
    _check_paths(config)
    return config


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: key {key!r} is given twice; keep one")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_config(command: str, path: str | None, overrides: list[str] | None = None,
                defaults: dict[str, Any] | None = None, values: dict[str, Any] | None = None):
    """Read YAML (optional), then `values` (keys the command line set by --flag or position) and `key=value`
    overrides, into the command's typed config; `defaults` fill keys none of them sets."""
    raw: dict[str, Any] = dict(defaults or {})
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {path!r} does not exist")
        try:
            loaded = yaml.load(p.read_text(), Loader=_UniqueKeyLoader) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: cannot be read ({err})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
        raw.update(loaded)
    given = parse_overrides(overrides or [])
    twice = sorted(set(values or {}) & set(given))
    if twice:
        raise ConfigError(f"{twice[0]} is given twice on the command line (as {flag_name(twice[0])} or by position, "
                          f"and as {twice[0]}=...); keep one")
    raw.update(values or {})
    raw.update(given)
    file_stage = raw.pop("stage", command)
    if file_stage != command:
        raise ConfigError(f"{path}: stage is {file_stage!r} but the command is {command!r}")
    return build_config(COMMANDS[command], raw)


def save_config(config: BaseModel, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
