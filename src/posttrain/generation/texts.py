"""Batched generation for `posttrain chat`, held-out evaluation and the quickstart: prompts in, texts out.

It runs on a generation backend over the model as it is now (generation/backend.py): a model still
being trained is evaluated with its current weights, and chat, evaluation, RL rollouts and the server
give the same greedy text: the text the generated ids add after the prompt, as the server's
incremental detokenizer gives it (inference/detokenize.py).
"""

from __future__ import annotations

import torch

from posttrain.errors import ConfigError
from posttrain.generation.backend import open_backend
from posttrain.inference.detokenize import decode_continuation
from posttrain.inference.sampling import SamplingParams


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int | None = 64, temperature: float = 0.0,
             top_p: float = 1.0, batch_size: int = 64, stop_ids: list[int] | None = None,
             backend: str = "engine") -> list[str]:
    """Completions for token-id prompts, without special tokens. Each stops at `max_new_tokens` (None: at the
    model's context) or where the context ends, whichever comes first."""
    stops = list(stop_ids or [tokenizer.eos_token_id])
    gen = open_backend(backend, model, tokenizer, max_batch_size=max(1, min(batch_size, len(prompts))),
                       purpose="generation")
    try:
        virtual = getattr(gen, "virtual_tokens", 0)
        params = []
        for i, prompt in enumerate(prompts):
            room = gen.max_seq_len - len(prompt)
            if room < 1:
                what = "the prompt" if len(prompts) == 1 else f"prompt {i}"
                raise ConfigError(f"{what} is {len(prompt)} tokens" + (f" (+{virtual} virtual)" if virtual else "")
                                  + f", which fills the model's context of {gen.max_seq_len + virtual} tokens: no "
                                  "room to generate; shorten it")
            params.append(SamplingParams(max_new_tokens=min(max_new_tokens or room, room), temperature=temperature,
                                         top_p=top_p, stop_token_ids=stops, ignore_eos=True))
        done = gen.generate(prompts, params)
    finally:
        gen.close()
    # As transformers' generate + decode: a stop token that is not a special token stays in the text.
    return [decode_continuation(tokenizer, p, c.token_ids) for p, c in zip(prompts, done)]
