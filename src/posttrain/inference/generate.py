"""Batched generation for `posttrain chat` and held-out evaluation, on the engine.

The engine reads the model's live parameters (no fused copies), so a model that is still being
trained is evaluated with its current weights (a LoRA model's adapted matrices are merged when the
engine is built, one per call). Models the engine's forward does not cover (other architectures,
prompt learning, DoRA) go through transformers' `generate`: both paths give the same greedy text,
the engine's is faster.
"""

from __future__ import annotations

import logging

import torch

from posttrain.errors import ConfigError
from posttrain.inference.sampling import SamplingParams

log = logging.getLogger(__name__)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, batch_size: int = 64, stop_ids: list[int] | None = None) -> list[str]:
    """Completions for token-id prompts, decoded without special tokens."""
    from posttrain.inference.engine import Engine

    stops = list(stop_ids or [tokenizer.eos_token_id])
    try:
        engine = Engine(model, tokenizer, max_batch_size=max(1, min(batch_size, len(prompts))), fuse_weights=False)
    except ConfigError as why:
        log.debug("engine does not cover this model (%s); using transformers generate", why)
        return _hf_generate(model, tokenizer, prompts, max_new_tokens, temperature, top_p, batch_size, stops)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                            stop_token_ids=stops, ignore_eos=True)
    # As transformers' generate + decode: a stop token that is not a special token stays in the text.
    return [tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in engine.generate(prompts, params)]


def _hf_generate(model, tokenizer, prompts, max_new_tokens, temperature, top_p, batch_size, stops) -> list[str]:
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
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
        kwargs = dict(do_sample=temperature > 0, max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=stops)
        if temperature > 0:
            kwargs.update(temperature=temperature, top_p=top_p)
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
        for row, i in enumerate(idx):
            out[i] = tokenizer.decode(gen[row, width:], skip_special_tokens=True)
    model.train(was_training)
    return out
