"""Prompt-tuning and P-tuning adapters: learned virtual tokens prepended to a row's prompt.

PEFT saves both as `prompt_embeddings` [num_virtual_tokens, hidden] — for P-tuning that is already
the prompt encoder's output, which does not depend on the input, so serving either is the same:
the row's prefill input is these embeddings followed by its prompt's token embeddings, and its
positions count the virtual tokens (as in PEFT's own generation). After prefill they are ordinary
KV-cache entries, so such rows decode in the same batch as LoRA and base rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from posttrain.inference.errors import AdapterError
from posttrain.inference.lora import read_adapter_tensors
from posttrain.inference.weights import ModelDims

PROMPT_TYPES = ("PROMPT_TUNING", "P_TUNING")


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
    emb = tensors["prompt_embeddings"]
    n = config.get("num_virtual_tokens")
    if emb.dim() != 2 or emb.shape[1] != dims.hidden or (n is not None and emb.shape[0] != n):
        raise AdapterError(f"{folder}: prompt_embeddings has shape {tuple(emb.shape)}, but the served model needs "
                           f"[{n if n is not None else 'num_virtual_tokens'}, {dims.hidden}]; the adapter was "
                           "trained on a different base model")
    return PromptEmbeddings(name, emb.to(dtype=dtype, device=device))
