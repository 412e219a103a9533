"""Load local Hugging Face causal-LM folders, offline.

posttrain never downloads: a name that is not a local folder gets a clear error at once rather
than a network wait. `trust_remote_code` stays off unless the config turns it on.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from posttrain.errors import ConfigError
from posttrain.model.files import adapter_base, check_adapter_files, check_model_files

def resolve_model_path(name_or_path: str, what: str = "model_name_or_path") -> Path:
    """The local model folder `name_or_path` names, its config and weights files checked (model/files.py)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            if (path / "adapter_config.json").is_file():
                raise ConfigError(f"{what}: {name_or_path!r} is a PEFT adapter, not a full model; pass its base "
                                  "model as model_name_or_path and this folder as adapter_name_or_path")
            raise ConfigError(f"{what}: {name_or_path!r} is a folder but has no config.json; "
                              "expected a Hugging Face model folder (config.json + weights + tokenizer)")
        check_model_files(path)
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


def check_attn_implementation(name: str) -> None:
    if name == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ConfigError("attn_implementation: flash_attention_2 needs the flash_attn package (CUDA only: "
                          "`pip install flash-attn`); use attn_implementation: sdpa")


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = Path(name_or_path).expanduser()
    # A model folder is checked whole here (the first thing every command loads); adapter folders ship a
    # tokenizer but no config.json.
    if (path / "config.json").is_file() or not (path / "tokenizer_config.json").is_file():
        path = resolve_model_path(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:  # many base models ship without one; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_on_meta(auto_class, path: Path, config, *, trust_remote_code: bool, **kwargs):
    """The model `auto_class` makes of `config`, built on the meta device: its structure and no weights (no
    memory, no file read). FSDP2's low-memory load builds it so on every rank but the first, which broadcasts
    its weights into the shards (train/parallel.py); its non-persistent buffers (rotary `inv_freq`) come
    from rank 0 there too."""
    try:
        with torch.device("meta"):
            return auto_class.from_config(config, trust_remote_code=trust_remote_code, **kwargs)
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise ConfigError(f"{path}: this model needs its own code; set trust_remote_code: true "
                              "if you trust the folder") from None
        raise


def load_model(name_or_path: str, *, device: torch.device, trust_remote_code: bool = False,
               attn_implementation: str = "sdpa", gradient_checkpointing: bool = False,
               dtype: torch.dtype = torch.float32, quantization_bit: int | None = None, on_meta: bool = False):
    """The model in `dtype` on `device`. Mixed precision is autocast in the loop, so weights stay fp32.

    `quantization_bit` (4 or 8) loads the base through bitsandbytes for QLoRA (CUDA only; the
    finetuning checks refuse it elsewhere before this runs). `on_meta`: the structure only, on the meta
    device (`build_on_meta`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    check_attn_implementation(attn_implementation)
    path = resolve_model_path(name_or_path)
    if on_meta:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = build_on_meta(AutoModelForCausalLM, path, config, trust_remote_code=trust_remote_code,
                              attn_implementation=attn_implementation, dtype=dtype)
        return finish_loading(model, gradient_checkpointing)
    extra = {}
    if quantization_bit is not None:
        from transformers import BitsAndBytesConfig

        extra["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=quantization_bit == 4, load_in_8bit=quantization_bit == 8, bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
        extra["device_map"] = {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, trust_remote_code=trust_remote_code, attn_implementation=attn_implementation, dtype=dtype, **extra)
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise ConfigError(f"{name_or_path}: this model needs its own code; set trust_remote_code: true "
                              "if you trust the folder") from None
        raise
    if quantization_bit is None:
        model.to(device)
    return finish_loading(model, gradient_checkpointing)


def finish_loading(model, gradient_checkpointing: bool):
    """The loaded model in evaluation mode (as `from_pretrained` leaves it), with checkpointing when asked."""
    model.eval()
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def load_for_inference(model_path: str, adapter: str | None = None, *, device: torch.device | None = None,
                       trust_remote_code: bool = False):
    """(model, tokenizer) for generation: a full model folder, a base + adapter, or an adapter folder alone
    (its base is the one its adapter_config.json records). The adapter's own tokenizer wins when it ships one.
    Every file is checked before the first one loads."""
    from posttrain.model.adapters import load_adapter

    device = device or pick_device("auto")
    folder = Path(model_path).expanduser()
    if adapter is None and (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        adapter = model_path
        model_path = adapter_base(adapter, check_adapter_files(adapter, "adapter"),
                                  "pass the base model folder and this adapter as `MODEL --adapter ADAPTER`")
    elif adapter is not None:
        check_adapter_files(adapter, "--adapter")
    resolve_model_path(model_path, "model")
    has_own_tokenizer = adapter is not None and (Path(adapter) / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(adapter if has_own_tokenizer else model_path, trust_remote_code)
    model = load_model(model_path, device=device, trust_remote_code=trust_remote_code)
    if adapter is not None:
        model = load_adapter(model, adapter)
    model.eval()
    return model, tokenizer
