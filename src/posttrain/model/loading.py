"""Load local Hugging Face causal-LM folders, offline.

posttrain never downloads: a name that is not a local folder gets a clear error at once rather
than a network wait. `trust_remote_code` stays off unless the config turns it on.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from posttrain.errors import ConfigError

# Set before transformers looks anything up: a missing local file must fail, not reach for a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def resolve_model_path(name_or_path: str, what: str = "model_name_or_path") -> Path:
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{what}: {name_or_path!r} is a folder but has no config.json; "
                              "expected a Hugging Face model folder (config.json + weights + tokenizer)")
        return path
    if path.exists():
        raise ConfigError(f"{what}: {name_or_path!r} is a file; expected a Hugging Face model folder")
    hint = ""
    if "/" in name_or_path and not name_or_path.startswith((".", "/", "~")):
        hint = (f" It looks like a hub id: posttrain loads models offline, so download it first "
                f"(e.g. `hf download {name_or_path} --local-dir models/{name_or_path.split('/')[-1]}`) "
                "and pass that folder.")
    raise ConfigError(f"{what}: {name_or_path!r} is not a local folder.{hint} "
                      "`posttrain init-model DIR` writes a tiny model to try things with.")


def pick_device(device: str = "auto") -> torch.device:
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("device: 'cuda' was asked for but no CUDA device is available")
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:  # many base models ship without one; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name_or_path: str, *, device: torch.device, trust_remote_code: bool = False,
               attn_implementation: str = "sdpa", gradient_checkpointing: bool = False,
               dtype: torch.dtype = torch.float32):
    """The model in `dtype` on `device`. Mixed precision is autocast in the loop, so weights stay fp32."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, trust_remote_code=trust_remote_code, attn_implementation=attn_implementation, dtype=dtype)
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise ConfigError(f"{name_or_path}: this model needs its own code; set trust_remote_code: true "
                              "if you trust the folder") from None
        raise
    model.to(device)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model
