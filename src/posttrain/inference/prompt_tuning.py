"""Prompt-based adapters: learned virtual tokens in front of a row's prompt.

Prompt tuning and P-tuning: PEFT saves both as `prompt_embeddings` [num_virtual_tokens, hidden] —
for P-tuning that is already the prompt encoder's output, which does not depend on the input, so
serving either is the same: the row's prefill input is these embeddings followed by its prompt's
token embeddings, and positions count the virtual tokens (as in PEFT's forward).

Prefix tuning: PEFT saves per-layer keys and values [num_virtual_tokens, layers * 2 * kv_size]; they
are written into the row's KV cache before its prompt, which starts at position num_virtual_tokens
(again as in PEFT's forward, where they arrive as past key values).

Either way, after prefill they are ordinary KV-cache entries, so such rows decode in the same batch
as LoRA and base rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from posttrain.inference.request_errors import AdapterError
from posttrain.inference.lora import read_adapter_tensors
from posttrain.inference.weights import ModelDims

PROMPT_TYPES = ("PROMPT_TUNING", "P_TUNING")
PREFIX_TYPES = ("PREFIX_TUNING",)


@dataclass
class PromptEmbeddings:
    name: str
    embeddings: torch.Tensor  # [num_virtual_tokens, hidden]

    @property
    def num_virtual_tokens(self) -> int:
        return self.embeddings.shape[0]

    def nbytes(self) -> int:
        return self.embeddings.numel() * self.embeddings.element_size()


def read_prompt_adapter(name: str, folder: Path, config: dict, dims: ModelDims, dtype: torch.dtype,
                        device: torch.device) -> PromptEmbeddings:
    if config.get("num_transformer_submodules", 1) != 1:
        raise AdapterError(f"{folder}: num_transformer_submodules={config['num_transformer_submodules']} "
                           "(an encoder-decoder adapter); the engine serves decoder-only models")
    tensors = read_adapter_tensors(folder)
    if set(tensors) != {"prompt_embeddings"}:
        raise AdapterError(f"{folder}: a {config['peft_type']} adapter should hold exactly `prompt_embeddings`; "
                           f"found {sorted(tensors)} (save it with PEFT's save_pretrained in inference mode)")
    return prompt_embeddings(name, tensors["prompt_embeddings"], config.get("num_virtual_tokens"), dims, dtype,
                             device, folder)


def prompt_embeddings(name: str, emb: torch.Tensor, n: int | None, dims: ModelDims, dtype: torch.dtype,
                      device: torch.device, where) -> PromptEmbeddings:
    """Soft-prompt vectors [num_virtual_tokens, hidden], checked against the served model."""
    if emb.dim() != 2 or emb.shape[1] != dims.hidden or (n is not None and emb.shape[0] != n):
        raise AdapterError(f"{where}: prompt_embeddings has shape {tuple(emb.shape)}, but the served model needs "
                           f"[{n if n is not None else 'num_virtual_tokens'}, {dims.hidden}]; the adapter was "
                           "trained on a different base model")
    return PromptEmbeddings(name, emb.to(dtype=dtype, device=device))


@dataclass
class PrefixKV:
    name: str
    keys: torch.Tensor  # [layers, kv_heads, num_virtual_tokens, head_dim]
    values: torch.Tensor

    @property
    def num_virtual_tokens(self) -> int:
        return self.keys.shape[2]

    def nbytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()


def read_prefix_adapter(name: str, folder: Path, config: dict, dims: ModelDims, dtype: torch.dtype,
                        device: torch.device) -> PrefixKV:
    if config.get("prefix_projection"):
        raise AdapterError(f"{folder}: a prefix-tuning adapter saved with prefix_projection=true holds the "
                           "projection's inputs, not the prefixes; save it in inference mode")
    tensors = read_adapter_tensors(folder)
    if set(tensors) != {"prompt_embeddings"}:
        raise AdapterError(f"{folder}: a PREFIX_TUNING adapter should hold exactly `prompt_embeddings`; "
                           f"found {sorted(tensors)}")
    return prefix_kv(name, tensors["prompt_embeddings"], dims, dtype, device, folder)


def prefix_kv(name: str, emb: torch.Tensor, dims: ModelDims, dtype: torch.dtype, device: torch.device,
              where) -> PrefixKV:
    """Per-layer keys and values from PEFT's flat prefix tensor, checked against the served model."""
    width = dims.num_layers * 2 * dims.kv_size
    if emb.dim() != 2 or emb.shape[1] != width:
        raise AdapterError(f"{where}: prompt_embeddings has shape {tuple(emb.shape)}, but the served model needs "
                           f"[num_virtual_tokens, {width}] ({dims.num_layers} layers x keys and values x "
                           f"{dims.kv_size}); the adapter was trained on a different base model")
    n = emb.shape[0]
    # PEFT's layout: [virtual, layer * 2 + (0 keys | 1 values), kv_head, head_dim]
    kv = emb.view(n, dims.num_layers * 2, dims.num_kv_heads, dims.head_dim).permute(1, 2, 0, 3)
    kv = kv.to(dtype=dtype, device=device)
    return PrefixKV(name, kv[0::2].contiguous(), kv[1::2].contiguous())


@torch.no_grad()
def from_peft_model(model, dims: ModelDims, dtype: torch.dtype, device: torch.device) -> PromptEmbeddings | PrefixKV:
    """The active adapter of a live prompt-learning PeftModel (being trained, or loaded for chat) as the engine
    runs it: the virtual tokens PEFT's forward would use now (as in PeftModel.get_prompt)."""
    name = model.active_adapter
    config = model.peft_config[name]
    peft_type = getattr(config.peft_type, "value", str(config.peft_type))
    where = f"adapter {name!r} ({peft_type})"
    if getattr(config, "num_transformer_submodules", 1) != 1:
        raise AdapterError(f"{where}: an encoder-decoder adapter; the engine runs decoder-only models")
    encoder = model.prompt_encoder[name]
    if config.inference_mode:  # loaded for inference: the embedding holds the encoder's saved output
        emb = encoder.embedding.weight.detach()
    else:
        tokens = model.prompt_tokens[name][:config.num_virtual_tokens].to(encoder.embedding.weight.device)
        was_training = encoder.training
        encoder.eval()  # no dropout in the prompt encoder while generating
        try:
            emb = encoder(tokens[None])[0]
        finally:
            encoder.train(was_training)
    if peft_type in PREFIX_TYPES:
        return prefix_kv(name, emb, dims, dtype, device, where)
    if peft_type in PROMPT_TYPES:
        return prompt_embeddings(name, emb, config.num_virtual_tokens, dims, dtype, device, where)
    raise AdapterError(f"{where}: the engine runs {', '.join(PROMPT_TYPES + PREFIX_TYPES)} prompt adapters")
