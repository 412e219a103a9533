"""`posttrain export`: merge a LoRA adapter into its base and write a standalone HF model folder.

The merged folder (weights + tokenizer + chat template) loads with plain transformers and serves
anywhere, at the base model's speed. Prompt-based adapters (P-tuning, prompt and prefix tuning)
add virtual tokens rather than weight deltas, so there is nothing to merge: those are refused.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch

from posttrain.config import ExportConfig, save_config
from posttrain.errors import ConfigError
from posttrain.model.adapters import load_adapter
from posttrain.model.files import PROMPT_ADAPTER_TYPES, adapter_base, check_adapter_files, read_json
from posttrain.model.loading import load_model, load_tokenizer, resolve_model_path
from posttrain.output_folder import EXPORT_MARKER, check_output_folder, clear_own_entries

log = logging.getLogger(__name__)


def base_of(config: ExportConfig, adapter_cfg: dict) -> str:
    """The base model folder: as configured, else the one the adapter records."""
    if config.model_name_or_path:
        return config.model_name_or_path
    return adapter_base(config.adapter_name_or_path, adapter_cfg, "set model_name_or_path=BASE_FOLDER")


def run_export(config: ExportConfig) -> Path:
    adapter_cfg = check_adapter_files(config.adapter_name_or_path)  # type, numbers and weights, before loading
    peft_type = str(adapter_cfg["peft_type"]).upper()
    if peft_type in PROMPT_ADAPTER_TYPES:
        raise ConfigError(f"{config.adapter_name_or_path}: a {peft_type} adapter adds virtual tokens, not weight "
                          "deltas, so it cannot be merged into the base; serve it as an adapter "
                          "(`posttrain serve` / `posttrain chat --adapter`) instead")
    base = base_of(config, adapter_cfg)
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
    cfg = read_json(Path(base) / "config.json", "config.json")
    recorded = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return getattr(torch, recorded, torch.float32)
