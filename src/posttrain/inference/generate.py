"""Plain batched generation for `posttrain chat` and held-out evaluation.

A stop-gap over transformers' `generate`; the serving issue replaces it with the engine
(KV-cache continuous batching, multi-LoRA) and keeps this interface.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, batch_size: int = 64, stop_ids: list[int] | None = None) -> list[str]:
    """Completions for token-id prompts (left-padded in batches), decoded without special tokens."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    eos = stop_ids or [tokenizer.eos_token_id]
    was_training = model.training
    model.eval()
    out: list[str] = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths: less padding
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(idx):
            ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]):] = 1
        kwargs = dict(do_sample=temperature > 0, max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos)
        if temperature > 0:
            kwargs.update(temperature=temperature, top_p=top_p)
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
        for row, i in enumerate(idx):
            out[i] = tokenizer.decode(gen[row, width:], skip_special_tokens=True)
    model.train(was_training)
    return out
