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

from posttrain.inference.request_errors import RequestError


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


_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 x, c < 2**32, in halves so no product leaves int64's range."""
    return ((x & 0xFFFF) * c + ((((x >> 16) * c) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """The "lowbias32" integer hash (C. Wellons): a bijection of 32-bit values with full avalanche."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def row_uniforms(seeds: list[int], counters: list[int]) -> torch.Tensor:
    """One uniform in [0, 1) (float64, 53 random bits) per row, a hash of the row's (seed, counter); on the CPU.

    A counter-based generator: a row's n-th draw depends on its seed and n alone, so it does not depend
    on the rows it is batched with, on the step it ran in, or on the device the model runs on. All rows
    take one batched computation instead of a generator call each (on a GPU, a kernel launch per row)."""
    seed = torch.tensor([s & ((1 << 63) - 1) for s in seeds], dtype=torch.long)  # any Python int is a seed
    counter = torch.tensor(counters, dtype=torch.long) & _M32
    h = _mix32((seed & _M32) ^ _mix32((seed >> 32) ^ _mix32(counter ^ 0x9E3779B9)))
    h2 = _mix32(h ^ 0x85EBCA6B)
    return ((h >> 5) * (1 << 26) + (h2 >> 6)).double() / float(1 << 53)


def _sample(logits: torch.Tensor, params: list[SamplingParams], uniform: torch.Tensor) -> torch.Tensor:
    """Temperature, top-k, top-p on rows logits [S,V], then one draw per row by inverse CDF at that row's
    `uniform` [S] (CPU). Returns the token ids [S] as a tensor on the logits' device; the per-row settings
    travel to the device in one copy and nothing here waits for it."""
    device, vocab = logits.device, logits.shape[-1]
    settings = torch.tensor([[p.temperature, p.top_k if p.top_k > 0 else vocab, p.top_p] for p in params],
                            dtype=torch.float64)
    settings = torch.cat([settings, uniform[:, None]], dim=1).to(device)
    temps, ks, top_p, uniform = settings.unbind(dim=1)
    probs = (logits / temps[:, None].to(logits.dtype)).softmax(dim=-1)
    order = None
    if any(p.top_k > 0 or p.top_p < 1 for p in params):  # filtering needs the tokens by rank
        probs, order = probs.sort(dim=-1, descending=True)
        probs = probs.masked_fill(torch.arange(vocab, device=device)[None, :] >= ks[:, None], 0.0)
        cumulative = probs.cumsum(dim=-1)
        # Keep a token while the mass before it is below top_p of what top-k kept (top-p reads the top-k
        # distribution renormalised, as transformers' warpers do).
        mass_before = cumulative - probs
        probs = probs.masked_fill(mass_before >= top_p[:, None].to(probs.dtype) * cumulative[:, -1:], 0.0)
    cdf = probs.double().cumsum(dim=-1)
    picks = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None], right=True)
    # Rounding at the top end must not pick past the last token that has mass.
    last = vocab - 1 - (probs.flip(-1) > 0).long().argmax(dim=-1, keepdim=True)
    picks = torch.minimum(picks, last)
    return (order.gather(1, picks) if order is not None else picks).squeeze(1)


def choose_tokens(logits: torch.Tensor, params: list[SamplingParams], seeds: list[int | None],
                  prompts: list[list[int]], generated: list[list[int]]) -> list[TokenChoice]:
    """The next token of every row of logits [B,V] (float32), with log-probs where asked. A sampled row
    draws with its seed and the number of tokens it has generated (row_uniforms)."""
    processed = logits
    penalized = [j for j, p in enumerate(params) if p.penalized]
    if penalized:
        processed = logits.clone()
        for j in penalized:
            _apply_penalties(processed[j], params[j], prompts[j], generated[j])
    tokens = processed.argmax(dim=-1)
    sampled = [j for j, p in enumerate(params) if not p.greedy]
    if sampled:
        rows = torch.tensor(sampled, device=logits.device)
        uniform = row_uniforms([seeds[j] for j in sampled], [len(generated[j]) for j in sampled])
        tokens[rows] = _sample(processed[rows], [params[j] for j in sampled], uniform)
    tokens = tokens.tolist()  # the step's one device-to-host copy
    choices = [TokenChoice(t) for t in tokens]
    wants = [j for j, p in enumerate(params) if p.logprobs is not None]
    if wants:
        logprobs = logits[wants].log_softmax(dim=-1)
        chosen = logprobs.gather(1, torch.tensor([[tokens[j]] for j in wants], device=logits.device))[:, 0].tolist()
        most = max(params[j].logprobs for j in wants)
        top = logprobs.topk(most, dim=-1) if most else None
        values, ids = (top.values.tolist(), top.indices.tolist()) if top is not None else ([], [])
        for row, j in enumerate(wants):
            choices[j].logprob = chosen[row]
            k = params[j].logprobs
            if k:
                choices[j].top = list(zip(ids[row][:k], values[row][:k]))
    return choices
