"""Batched generation for `posttrain chat` and held-out evaluation, on the engine the server runs.

The engine reads the model's live parameters (no fused copies), so a model that is still being
trained is evaluated with its current weights (a LoRA model's adapted matrices are merged when the
engine is built, one per call; a prompt-learning model's virtual tokens are its prompt encoder's
current output, run as the server runs a saved adapter). So chat, evaluation, RL rollouts and the
server give the same greedy text: the text the generated ids add after the prompt, as the server's
incremental detokenizer gives it (inference/detokenize.py). Only models the engine's forward does
not cover (other architectures, DoRA) go through transformers' `generate`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from posttrain.errors import ConfigError
from posttrain.inference.detokenize import decode_continuation
from posttrain.inference.sampling import SamplingParams
from posttrain.model.parts import prompt_learning_config

log = logging.getLogger(__name__)


def split_prompt_learning(model):
    """(model the engine runs, the prompt-learning PeftModel around it or None)."""
    if prompt_learning_config(model) is not None:
        return model.get_base_model(), model
    return model, None


def live_adapter(prompt_model, engine, tokenizer):
    """The engine's Adapter for a prompt-learning PeftModel's active adapter, as its weights are now."""
    from posttrain.inference.prompt_tuning import PrefixKV, from_peft_model
    from posttrain.inference.registry import Adapter

    held = from_peft_model(prompt_model, engine.dims, engine.weights.dtype, engine.device)
    if isinstance(held, PrefixKV):
        return Adapter(held.name, Path(), "prefix", tokenizer, None, prefix=held)
    return Adapter(held.name, Path(), "prompt", tokenizer, None, prompt=held)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int | None = 64, temperature: float = 0.0,
             top_p: float = 1.0, batch_size: int = 64, stop_ids: list[int] | None = None) -> list[str]:
    """Completions for token-id prompts, without special tokens. Each stops at `max_new_tokens` (None: at the
    model's context) or where the context ends, whichever comes first."""
    from posttrain.inference.engine import Engine

    stops = list(stop_ids or [tokenizer.eos_token_id])
    base, prompt_model = split_prompt_learning(model)
    try:
        engine = Engine(base, tokenizer, max_batch_size=max(1, min(batch_size, len(prompts))), fuse_weights=False)
        adapter = live_adapter(prompt_model, engine, tokenizer) if prompt_model is not None else None
    except ConfigError as why:
        log.debug("engine does not cover this model (%s); using transformers generate", why)
        limit = max_new_tokens or _context_left(model, prompts)
        return _hf_generate(model, tokenizer, prompts, limit, temperature, top_p, batch_size, stops)
    virtual = (adapter.prompt or adapter.prefix).num_virtual_tokens if adapter is not None else 0
    params = []
    for i, prompt in enumerate(prompts):
        room = engine.max_seq_len - virtual - len(prompt)
        if room < 1:
            what = "the prompt" if len(prompts) == 1 else f"prompt {i}"
            raise ConfigError(f"{what} is {len(prompt)} tokens" + (f" (+{virtual} virtual)" if virtual else "")
                              + f", which fills the model's context of {engine.max_seq_len} tokens: no room to "
                              "generate; shorten it")
        params.append(SamplingParams(max_new_tokens=min(max_new_tokens or room, room), temperature=temperature,
                                     top_p=top_p, stop_token_ids=stops, ignore_eos=True))
    done = engine.generate(prompts, params, [adapter] * len(prompts))
    # As transformers' generate + decode: a stop token that is not a special token stays in the text.
    return [decode_continuation(tokenizer, p, c.token_ids) for p, c in zip(prompts, done)]


def _context_left(model, prompts: list[list[int]]) -> int:
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None) or 2048
    return max(1, limit - max(len(p) for p in prompts))


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
            out[i] = decode_continuation(tokenizer, prompts[i], gen[row, width:].tolist())
    model.train(was_training)
    return out
