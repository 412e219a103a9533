"""Model and adapter files checked before anything loads them: the one check every command shares.

A broken file must give a one-line error that names the file, what is wrong with it and what to do,
before long work starts — not a traceback from deep inside transformers, PEFT or safetensors, and
never a network lookup for a file that is missing here. The checks are cheap: safetensors files are
checked through their header (which must cover the file exactly, so truncation is caught), pickled
`.bin` files are opened with `torch.load(weights_only=True)`, which refuses anything but tensors and
plain containers (a pickle can run code when loaded; posttrain never unpickles arbitrary objects).

`sft`, `chat`, `export`, `score` (model/loading.py, model/adapters.py) and `serve`
(inference/lora.py) all read model folders, adapter configs and adapter weights through here.
"""

from __future__ import annotations

import json
import numbers
import pickle
import zipfile
from functools import lru_cache
from pathlib import Path

import torch

from posttrain.errors import ConfigError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# peft_type -> what posttrain calls it; PEFT writes these names into adapter_config.json
ADAPTER_TYPES = {"LORA": "lora", "P_TUNING": "ptuning", "PROMPT_TUNING": "prompt_tuning",
                 "PREFIX_TUNING": "prefix_tuning"}
PROMPT_ADAPTER_TYPES = ("P_TUNING", "PROMPT_TUNING", "PREFIX_TUNING")
# Numbers in adapter_config.json that PEFT and the engine divide by or size tensors with: each must be
# a positive number of its kind when present (lora_alpha 0 would also make the adapter a no-op).
POSITIVE_INTS = ("r", "num_virtual_tokens", "token_dim", "num_layers", "num_attention_heads",
                 "num_transformer_submodules", "encoder_hidden_size")
POSITIVE_NUMBERS = ("lora_alpha",)


def read_json(path: Path, what: str) -> dict:
    """A JSON object from `path`, or a ConfigError naming the file."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: {what} is not valid JSON ({err}); the file is damaged — copy or save the "
                          "folder again") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: {what} should hold a JSON object, found {type(data).__name__}")
    return data


# -- weights files --------------------------------------------------------------------------------

def check_weights_file(path: Path) -> None:
    """Refuse a weights file that cannot be read safely: corrupt or truncated safetensors, or a pickle
    holding anything but tensors."""
    _check_weights_file(str(path), *_stamp(path))


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


@lru_cache(maxsize=256)
def _check_weights_file(path: str, size: int, mtime_ns: int) -> None:
    # Cached by (path, size, mtime): a command resolves the same folder several times, the file once.
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(path, "pt") as handle:
                handle.keys()
        except Exception as err:  # safetensors raises its own error type for every defect
            raise ConfigError(f"{path}: cannot read safetensors ({err}); the file is truncated or corrupt — "
                              "copy or save it again") from None
        return
    _load_pickled_tensors(Path(path), mmap=True)


def _load_pickled_tensors(path: Path, mmap: bool = False) -> dict:
    try:
        # mmap reads no tensor data up front (zip-format files only; older torch.save files are read whole)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except pickle.UnpicklingError:
        raise ConfigError(f"{path}: holds pickled objects other than tensors, which posttrain does not load "
                          "(unpickling them can run arbitrary code); convert the weights to safetensors from a "
                          "trusted copy, or save them again") from None
    except Exception as err:  # a truncated zip, a foreign file
        raise ConfigError(f"{path}: cannot read these weights ({str(err).splitlines()[0]}); the file is truncated "
                          "or corrupt — copy or save it again") from None


# -- model folders --------------------------------------------------------------------------------

def check_model_files(folder: Path) -> None:
    """A model folder's config.json parses and every weights file in it is readable and safe."""
    read_json(folder / "config.json", "config.json")
    # Only weights: a checkpoint's other pickles (training_args.bin, ...) are never loaded by posttrain.
    weights = [p for p in sorted(folder.iterdir()) if p.is_file() and (
        p.suffix == ".safetensors" or (p.suffix == ".bin" and p.name.startswith("pytorch_model")))]
    if not weights:
        raise ConfigError(f"{folder}: has config.json but no weights (model.safetensors or pytorch_model.bin); "
                          "the folder is incomplete — copy or save the model again")
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            shards = sorted(set(read_json(index, index_name).get("weight_map", {}).values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise ConfigError(f"{index}: lists weight shards that are not in the folder: {missing[:3]}; "
                                  "copy the missing files")
    for path in weights:
        check_weights_file(path)


# -- adapter folders ------------------------------------------------------------------------------

def read_adapter_config(path: str | Path, key: str = "adapter_name_or_path") -> dict:
    """adapter_config.json of a PEFT adapter folder, with its type and numbers checked."""
    folder = Path(path).expanduser()
    cfg_path = folder / ADAPTER_CONFIG
    if not cfg_path.is_file():
        what = "a full model folder (config.json)" if (folder / "config.json").is_file() else "not an adapter folder"
        raise ConfigError(f"{key}: {str(path)!r} is {what}; expected a PEFT adapter folder with {ADAPTER_CONFIG} "
                          "(and adapter_model.safetensors)")
    cfg = read_json(cfg_path, ADAPTER_CONFIG)
    peft_type = cfg.get("peft_type")
    if not peft_type:
        raise ConfigError(f"{cfg_path}: has no peft_type; expected a PEFT adapter config")
    if str(peft_type).upper() not in ADAPTER_TYPES:
        raise ConfigError(f"{cfg_path}: adapter type {peft_type!r} is not supported; posttrain loads "
                          f"{', '.join(ADAPTER_TYPES)} adapters (merge other types into the base model with PEFT)")
    for name in POSITIVE_INTS + POSITIVE_NUMBERS:
        value = cfg.get(name)
        kind = numbers.Integral if name in POSITIVE_INTS else numbers.Real
        if value is not None and not (isinstance(value, kind) and not isinstance(value, bool) and value > 0):
            word = "integer" if name in POSITIVE_INTS else "number"
            raise ConfigError(f"{cfg_path}: {name} must be a positive {word}, got {value!r}; the file is damaged "
                              "or was edited by hand — fix the value or save the adapter again")
    return cfg


def adapter_weights_file(path: str | Path) -> Path:
    """The adapter's weights file, checked; a folder without one is refused here (PEFT would go to a hub)."""
    folder = Path(path).expanduser()
    for name in ADAPTER_WEIGHTS:
        if (folder / name).is_file():
            check_weights_file(folder / name)
            return folder / name
    raise ConfigError(f"{folder}: has {ADAPTER_CONFIG} but no adapter weights ({' or '.join(ADAPTER_WEIGHTS)}); "
                      "the folder is incomplete — copy it again or point to the folder the adapter was saved in")


def check_adapter_files(path: str | Path, key: str = "adapter_name_or_path") -> dict:
    """An adapter folder's config and weights checked; its config returned."""
    cfg = read_adapter_config(path, key)
    adapter_weights_file(path)
    return cfg


def read_adapter_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of an adapter's weights file (safetensors, or a weights-only pickle)."""
    from safetensors.torch import load_file

    weights = adapter_weights_file(path)
    if weights.suffix == ".safetensors":
        try:
            return load_file(weights)
        except Exception as err:  # changed on disk after the check
            raise ConfigError(f"{weights}: cannot read safetensors ({err})") from None
    return _load_pickled_tensors(weights)


def adapter_base(path: str | Path, cfg: dict, how_to_pass: str) -> str:
    """The base model folder an adapter records, found from anywhere: as recorded (absolute, or relative to
    the working directory), else relative to the adapter folder. `how_to_pass` says how the command takes
    a base explicitly."""
    recorded = cfg.get("base_model_name_or_path")
    if not recorded:
        raise ConfigError(f"{path}: the adapter does not record its base model; {how_to_pass}")
    candidate = Path(recorded).expanduser()
    if candidate.is_dir():
        return str(candidate)
    beside = Path(path).expanduser() / candidate
    if not candidate.is_absolute() and beside.is_dir():
        return str(beside)
    raise ConfigError(f"{path}: the adapter records its base model as {recorded!r}, which is not a folder here "
                      f"(nor relative to the adapter folder); {how_to_pass}")
