"""`posttrain export`: merge a LoRA adapter into its base and write a standalone HF model folder.

The merged folder (weights + tokenizer + chat template) loads with plain transformers and serves
anywhere, at the base model's speed. Prompt-based adapters (P-tuning, prompt and prefix tuning)
add virtual tokens rather than weight deltas, so there is nothing to merge: those are refused.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch

from posttrain.config import ExportConfig, save_config
from posttrain.errors import ConfigError
from posttrain.model.adapters import load_adapter, read_adapter_config
from posttrain.model.loading import load_model, load_tokenizer, resolve_model_path
from posttrain.output_folder import EXPORT_MARKER, check_output_folder, clear_own_entries

log = logging.getLogger(__name__)


def base_of(config: ExportConfig) -> str:
    """The base model folder: as configured, else the one the adapter records."""
    if config.model_name_or_path:
        return config.model_name_or_path
    recorded = read_adapter_config(config.adapter_name_or_path).get("base_model_name_or_path")
    if not recorded:
        raise ConfigError(f"{config.adapter_name_or_path}: the adapter does not record its base model; "
                          "set model_name_or_path")
    return recorded


def run_export(config: ExportConfig) -> Path:
    adapter_cfg = read_adapter_config(config.adapter_name_or_path)
    if str(adapter_cfg.get("peft_type", "")).upper() != "LORA":
        raise ConfigError(f"{config.adapter_name_or_path}: a {adapter_cfg.get('peft_type')} adapter adds virtual "
                          "tokens, not weight deltas, so it cannot be merged into the base; serve it as an adapter "
                          "(`posttrain serve` / `posttrain chat --adapter`) instead")
    base = base_of(config)
    resolve_model_path(base)
    out = Path(config.export_dir)
    check_output_folder(config.export_dir, key="export_dir", marker=EXPORT_MARKER,
                        overwrite=config.overwrite_output_dir,
                        inputs=[("adapter_name_or_path", config.adapter_name_or_path), ("the base model", base)])
    # An adapter trained here ships the tokenizer (and chat template) it was trained with.
    has_own = (Path(config.adapter_name_or_path) / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(config.adapter_name_or_path if has_own else base, config.trust_remote_code)
    model = load_model(base, device=torch.device("cpu"), trust_remote_code=config.trust_remote_code)
    model = load_adapter(model, config.adapter_name_or_path).merge_and_unload()
    dtype = _export_dtype(config.export_dtype, base)
    model.to(dtype)
    # Written beside the target and renamed into place: an interrupted export leaves no half folder.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-export-{out.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        save_config(config, tmp / EXPORT_MARKER)
        # Only an earlier export's own entries go (checked above: the folder holds nothing else).
        clear_own_entries(out)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _export_dtype(name: str, base: str) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    cfg = json.loads((Path(base) / "config.json").read_text())
    recorded = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return getattr(torch, recorded, torch.float32)
