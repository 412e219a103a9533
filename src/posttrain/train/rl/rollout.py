"""Completions from the actor as it is right now: the inference engine over the live weights.

The engine (inference/engine.py) is built once with `fuse_weights=False`: it keeps references to
the actor's parameters, not copies, so every optimizer step is seen by the next rollout with no
weight sync. Its continuous batching lets short completions leave the batch early and its KV cache
makes each new token one small forward, which is where RL spends most of its time. A LoRA actor
runs on the engine too, from merged copies of its adapted matrices that are refreshed before each
batch of rollouts (inference/weights.py). A model the engine's forward does not cover (another
architecture, a DoRA actor) is sampled with transformers' `generate` instead.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch

from posttrain.errors import ConfigError
from posttrain.inference.sampling import SamplingParams

log = logging.getLogger(__name__)


@dataclass
class Rollout:
    prompt_ids: list[int]
    response_ids: list[int]  # the generated tokens, with the stop token when the model stopped
    text: str  # the response decoded without special tokens: what the rewards read
    stopped: bool  # False: cut at max_completion_length
    logprobs: list[float] | None = None  # the sampler's log-prob of each response token (engine, when asked)


class RolloutSampler:
    def __init__(self, model, tokenizer, *, max_batch_size: int, seed: int, end_of_turn: list[int] = ()):
        """`end_of_turn`: the chat template's end-of-turn tokens (data/templates.py), stops beside EOS."""
        from posttrain.inference.engine import Engine

        self.model, self.tokenizer = model, tokenizer
        self.end_of_turn = list(end_of_turn)
        self.stop_ids = {tokenizer.eos_token_id, *self.end_of_turn}
        try:
            self.engine = Engine(model, tokenizer, max_batch_size=max_batch_size, fuse_weights=False, seed=seed)
            self.stop_ids |= set(self.engine.model_stop_ids)
        except ConfigError as why:
            log.info("rollouts use transformers generate (the engine does not cover this model: %s)", why)
            self.engine = None

    def sample(self, prompts: list[list[int]], *, max_new_tokens: int, temperature: float, top_p: float = 1.0,
               top_k: int = 0, seeds: list[int] | None = None, logprobs: bool = False) -> list[Rollout]:
        """One completion per prompt (repeat a prompt in the list for a group); temperature 0 is greedy.
        `seeds`: one per row, so a row's sample does not depend on which other rows share the batch
        (or the process); without them the engine draws seeds in row order. `logprobs`: keep the engine's
        log-prob of each sampled token (of the unscaled logits; transformers' generate gives none)."""
        if self.engine is not None:
            params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                    top_k=top_k, stop_token_ids=self.end_of_turn, logprobs=0 if logprobs else None)
            if seeds is not None:
                params = [replace(params, seed=s) for s in seeds]
            self.engine.weights.refresh()  # a LoRA actor's merged copies follow its last update
            done = self.engine.generate(prompts, params)
            return [Rollout(p, c.token_ids, c.text, c.finish_reason == "stop",
                            [t.logprob for t in c.logprobs] if logprobs else None) for p, c in zip(prompts, done)]
        if seeds:  # transformers' sampling draws from the global generator: at least decorrelate the processes
            torch.manual_seed(seeds[0])
        return self._hf_sample(prompts, max_new_tokens, temperature, top_p, top_k)

    @torch.no_grad()
    def _hf_sample(self, prompts, max_new_tokens, temperature, top_p, top_k) -> list[Rollout]:
        model, tok = self.model, self.tokenizer
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(prompts):  # left-padded: every row generates from the same column
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=sorted(self.stop_ids),
                      do_sample=temperature > 0)
        if temperature > 0:
            kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k or None)
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)[:, width:].tolist()
        model.train(was_training)
        rollouts = []
        for p, row in zip(prompts, out):
            stop = next((i for i, t in enumerate(row) if t in self.stop_ids), None)
            response = row[:stop + 1] if stop is not None else row
            body = response[:-1] if stop is not None else response
            rollouts.append(Rollout(p, response, tok.decode(body, skip_special_tokens=True), stop is not None))
        return rollouts
