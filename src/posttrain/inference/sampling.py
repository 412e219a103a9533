"""Sampling parameters and the choice of the next token for a whole batch.

The order of logit processing is transformers': repetition penalty (HF semantics: prompt and
generated tokens), OpenAI presence/frequency penalties (generated tokens only), then temperature,
top-k and top-p. temperature 0 means greedy. Every sampled row draws from its own generator, seeded
by the request's `seed` (or by the engine when none is given), so a seeded request gives the same
text whichever requests share its batch. Log-probs are those of the model's own distribution (raw
logits, before penalties and temperature), which is what OpenAI's API reports.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from posttrain.inference.errors import RequestError


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    repetition_penalty: float = 1.0  # HF semantics, >1 discourages repeats
    presence_penalty: float = 0.0  # OpenAI semantics, -2..2
    frequency_penalty: float = 0.0  # OpenAI semantics, -2..2
    stop: list[str] = field(default_factory=list)  # generation ends before the first occurrence
    stop_token_ids: list[int] = field(default_factory=list)  # in addition to the tokenizer's end-of-turn ids
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None  # None: off; 0: the chosen token's; k: also the k most likely alternatives

    def validate(self, vocab_size: int) -> "SamplingParams":
        def bad(param: str, why: str):
            raise RequestError(f"{param}: {why}", param=param)

        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            bad("max_tokens", f"must be a positive integer, got {self.max_new_tokens!r}")
        if not 0 <= self.temperature <= 100:
            bad("temperature", f"must be between 0 and 100, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            bad("top_k", f"must be >= 0 (0 = off), got {self.top_k}")
        if self.repetition_penalty <= 0:
            bad("repetition_penalty", f"must be > 0 (1 = off), got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                bad(name, f"must be between -2 and 2, got {getattr(self, name)}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", "stop strings must be non-empty strings")
        if any(not isinstance(t, int) or not 0 <= t < vocab_size for t in self.stop_token_ids):
            bad("stop_token_ids", f"token ids must be integers in [0, {vocab_size})")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            bad("logprobs", f"must be between 0 and 20, got {self.logprobs}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


@dataclass
class TokenChoice:
    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None  # the most likely tokens and their log-probs


def _apply_penalties(logits: torch.Tensor, params: SamplingParams, prompt: list[int], generated: list[int]) -> None:
    """In place on one row's logits [V]."""
    if params.repetition_penalty != 1:
        seen = torch.tensor(prompt + generated, device=logits.device)
        scores = logits[seen]
        logits[seen] = torch.where(scores > 0, scores / params.repetition_penalty, scores * params.repetition_penalty)
    if generated and (params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(torch.tensor(generated, device=logits.device), minlength=logits.shape[0]).to(logits.dtype)
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(logits.dtype)


def _sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> list[int]:
    """Temperature, top-k, top-p on rows logits [S,V]; one draw per row from its own generator."""
    device = logits.device
    temps = torch.tensor([p.temperature for p in params], device=device, dtype=logits.dtype)
    scaled = logits / temps[:, None]
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    ks = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=device)
    rank = torch.arange(vocab, device=device)[None, :]
    sorted_logits = sorted_logits.masked_fill(rank >= ks[:, None], float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    top_p = torch.tensor([p.top_p for p in params], device=device, dtype=probs.dtype)
    mass_before = probs.cumsum(dim=-1) - probs  # keep a token while the mass before it is below top_p
    probs = probs.masked_fill(mass_before >= top_p[:, None], 0.0)
    picks = [int(torch.multinomial(probs[j], 1, generator=generators[j])) for j in range(len(params))]
    return [int(order[j, k]) for j, k in enumerate(picks)]


def choose_tokens(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
                  prompts: list[list[int]], generated: list[list[int]]) -> list[TokenChoice]:
    """The next token of every row of logits [B,V] (float32), with log-probs where asked."""
    processed = logits
    penalized = [j for j, p in enumerate(params) if p.penalized]
    if penalized:
        processed = logits.clone()
        for j in penalized:
            _apply_penalties(processed[j], params[j], prompts[j], generated[j])
    tokens = processed.argmax(dim=-1).tolist()
    sampled = [j for j, p in enumerate(params) if not p.greedy]
    if sampled:
        draws = _sample(processed[sampled], [params[j] for j in sampled], [generators[j] for j in sampled])
        for j, t in zip(sampled, draws):
            tokens[j] = t
    choices = [TokenChoice(t) for t in tokens]
    wants = [j for j, p in enumerate(params) if p.logprobs is not None]
    if wants:
        logprobs = logits[wants].log_softmax(dim=-1)
        for row, j in enumerate(wants):
            choices[j].logprob = float(logprobs[row, tokens[j]])
            k = params[j].logprobs
            if k:
                values, ids = logprobs[row].topk(k)
                choices[j].top = list(zip(ids.tolist(), values.tolist()))
    return choices
