"""The generation engine: continuous batching over a KV cache, many adapters in one batch.

One `step()` does, in order:
1. admit waiting requests into free batch slots (pinning their adapters; a request whose adapter
   cannot get a bank slot yet waits, the ones behind it are still admitted),
2. one decode step for every row already running (one token each),
3. one prefill for the rows just admitted (their first token),
4. stop checks, then finished rows leave at once and the cache is compacted, so the slot is free
   for the next step's admissions.
Requests therefore join and leave between any two decode steps; nobody waits for the longest
sequence of a batch. The engine is single-threaded: the server's worker thread owns it
(serve/worker.py); RL rollouts or `generate()` call it directly.
"""

from __future__ import annotations

import itertools
import random
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from posttrain.errors import PosttrainError
from posttrain.inference import forward
from posttrain.inference.cuda_graphs import DecodeGraphs
from posttrain.inference.detokenize import TextTracker, decode_continuation
from posttrain.inference.request_errors import RequestError, RequestTooLarge
from posttrain.inference.kv_cache import KVCache
from posttrain.inference.lora import LoraWeights
from posttrain.inference.registry import Adapter, AdapterRegistry
from posttrain.inference.sampling import SamplingParams, TokenChoice, choose_tokens
from posttrain.inference.weights import DecoderWeights

_ids = itertools.count()


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    adapter: Adapter | None = None
    stream: bool = False  # report text deltas every step (else text once, at the end)
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    # The adapter's LoRA weights, read before the request reached the engine (the server does, off the step,
    # with registry.read_weights); None: read at admission if the adapter is not resident.
    lora_weights: LoraWeights | None = None
    # When the engine took it from the queue and when its first token was chosen (time.perf_counter(), set by
    # the engine thread): the server's queue-time and time-to-first-token metrics.
    started_at: float | None = None
    first_token_at: float | None = None


@dataclass
class Output:
    """What happened to one request in one step (streaming), or its whole result (at the end)."""

    request_id: str
    text: str  # new text since the last output of this request
    token_ids: list[int]  # new tokens since the last output
    logprobs: list[TokenChoice]  # for the new tokens, when the request asked for log-probs
    finished: bool = False
    finish_reason: str | None = None  # "stop", "length", "abort" or "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None  # why a request could not run (finish_reason "error")


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[TokenChoice]


@dataclass(eq=False)
class _Sequence:
    request: Request
    prompt: list[int]
    stop_ids: frozenset[int]
    tokenizer: object
    seed: int | None  # sampled rows: the seed of their draws (sampling.row_uniforms); None for greedy
    lora_slot: int = 0
    length: int = 0  # positions written to the KV cache (virtual tokens + prompt + generated - 1)
    generated: list[int] = field(default_factory=list)
    new_tokens: list[int] = field(default_factory=list)  # since the last Output
    new_choices: list[TokenChoice] = field(default_factory=list)
    tracker: TextTracker | None = None
    finish_reason: str | None = None


class Engine:
    def __init__(self, model, tokenizer, *, registry: AdapterRegistry | None = None, max_batch_size: int = 32,
                 max_seq_len: int | None = None, max_prefill_tokens: int = 4096, fuse_weights: bool = True,
                 seed: int | None = None, cuda_graphs: bool = True):
        self.weights = DecoderWeights(model, fuse=fuse_weights, max_positions=max_seq_len)
        dims = self.weights.dims
        self.dims = dims
        self.tokenizer = tokenizer
        self.registry = registry
        self.max_batch_size = max_batch_size
        self.max_seq_len = dims.max_positions
        self.max_prefill_tokens = max_prefill_tokens
        self.device = self.weights.device
        self.cache = KVCache(dims.num_layers, dims.num_kv_heads, dims.head_dim, max_batch_size, self.max_seq_len,
                             self.weights.dtype, self.device)
        # On a GPU, decode steps replay captured graphs (launch-bound otherwise; see cuda_graphs.py).
        self.graphs = DecodeGraphs(self.weights, self.cache, max_batch_size) if (
            cuda_graphs and self.device.type == "cuda") else None
        self.model_stop_ids = self._model_stop_ids(model, tokenizer)
        self.waiting: list[Request] = []
        self.running: list[_Sequence] = []  # running[i] lives in cache slot i
        self._failed: list[Output] = []  # requests that could not start, reported by the next step
        self._seeds = random.Random(seed)

    @staticmethod
    def _model_stop_ids(model, tokenizer) -> frozenset[int]:
        from posttrain.generation.backend import stop_ids_of

        return frozenset(stop_ids_of(model, tokenizer))

    # ---- requests in ----

    def add(self, request: Request) -> str:
        """Queue a request after checking it fits; raises RequestError / RequestTooLarge otherwise."""
        self.check(request)
        self.waiting.append(request)
        return request.request_id

    def check(self, request: Request) -> None:
        """Raise RequestError / RequestTooLarge unless the request can run. Reads no engine state, so any
        thread may call it (the server checks requests before handing them to the engine thread)."""
        request.params.validate(self.dims.vocab)
        prompt = request.prompt_ids
        if not prompt:
            raise RequestError("the prompt is empty", param="prompt")
        if min(prompt) < 0 or max(prompt) >= self.dims.vocab:
            raise RequestError(f"prompt token ids must be in [0, {self.dims.vocab})", param="prompt")
        virtual = self._virtual_tokens(request)
        total = virtual + len(prompt) + request.params.max_new_tokens
        if total > self.max_seq_len:
            raise RequestTooLarge(
                f"This model's maximum context length is {self.max_seq_len} tokens. However, you requested {total} "
                f"tokens ({virtual + len(prompt)} in the prompt, {request.params.max_new_tokens} for the completion). "
                "Please reduce the prompt or max_tokens.", param="max_tokens")

    @staticmethod
    def _virtual_tokens(request: Request) -> int:
        return request.adapter.virtual_tokens if request.adapter is not None else 0

    def abort(self, request_id: str) -> None:
        self.waiting = [r for r in self.waiting if r.request_id != request_id]
        for seq in self.running:
            if seq.request.request_id == request_id and seq.finish_reason is None:
                seq.finish_reason = "abort"

    def abort_all(self) -> list[str]:
        """Drop every request (after an internal error); returns their ids."""
        ids = [r.request_id for r in self.waiting] + [s.request.request_id for s in self.running]
        for seq in self.running:
            if seq.request.adapter is not None and self.registry is not None:
                self.registry.release(seq.request.adapter)
        self.waiting, self.running = [], []
        return ids

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step ----

    @torch.inference_mode()
    def step(self) -> list[Output]:
        if self.registry is not None:
            self.registry.collect()
        old = [s for s in self.running]
        new = self._admit()
        if old:
            self._decode(old)
        # Rows sharing a prefix-tuning adapter (or none) prefill together; within that, longest prompts first,
        # cut into groups whose right-padding stays small: prefill computes padded positions too, and the
        # prompt lengths of a burst of requests vary a lot.
        new.sort(key=lambda s: (self._prefix_key(s), -self._width(s)))
        start = 0
        while start < len(new):
            key = self._prefix_key(new[start])
            end = start
            while end < len(new) and self._prefix_key(new[end]) == key:
                end += 1
            for group in self._padding_groups([self._width(s) for s in new[start:end]]):
                self._prefill(new[start:start + group], first_slot=len(old) + start)
                start += group
        now = time.perf_counter()
        for seq in new:
            seq.request.first_token_at = now  # prefill chose it
        self.running = old + new
        outputs = self._failed + [out for seq in self.running if (out := self._report(seq)) is not None]
        self._failed = []
        self._compact()
        return outputs

    def _admit(self) -> list[_Sequence]:
        admitted: list[_Sequence] = []
        widest = 0
        for request in list(self.waiting):
            if len(self.running) + len(admitted) >= self.max_batch_size:
                break
            width = self._virtual_tokens(request) + len(request.prompt_ids)
            if admitted and (len(admitted) + 1) * max(widest, width) > self.max_prefill_tokens:
                break
            lora_slot = 0
            if request.adapter is not None and self.registry is not None:
                try:
                    lora_slot = self.registry.acquire(request.adapter, request.lora_weights)
                except Exception as err:  # any failure of one adapter fails its request alone, never the step
                    self.waiting.remove(request)
                    message = str(err) if isinstance(err, PosttrainError) else (
                        f"adapter {request.adapter.name!r} cannot be used: {type(err).__name__}: {err}")
                    self._failed.append(Output(request.request_id, "", [], [], True, "error", error=message))
                    continue
                if lora_slot is None:  # every bank slot is pinned by running requests: wait for one
                    continue
                request.lora_weights = None  # in the bank now; the host copy is not needed
            self.waiting.remove(request)
            widest = max(widest, width)
            admitted.append(self._start(request, lora_slot))
        return admitted

    def _start(self, request: Request, lora_slot: int) -> _Sequence:
        params = request.params
        adapter = request.adapter
        tokenizer = adapter.tokenizer if adapter is not None else self.tokenizer
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids |= self.model_stop_ids
            if tokenizer.eos_token_id is not None:
                stop_ids.add(tokenizer.eos_token_id)
        seed = None
        if not params.greedy:
            seed = params.seed if params.seed is not None else self._seeds.getrandbits(63)
        request.started_at = time.perf_counter()
        seq = _Sequence(request, list(request.prompt_ids), frozenset(stop_ids), tokenizer, seed, lora_slot)
        if request.stream or params.stop:
            seq.tracker = TextTracker(tokenizer, seq.prompt, params.stop)
        return seq

    def _width(self, seq: _Sequence) -> int:
        """Positions the row's prefill computes (prefix-tuning prefixes are not computed, only attended)."""
        adapter = seq.request.adapter
        return len(seq.prompt) + (adapter.prompt.num_virtual_tokens if adapter is not None and adapter.kind == "prompt" else 0)

    @staticmethod
    def _prefix_key(seq: _Sequence) -> int:
        adapter = seq.request.adapter
        return id(adapter) if adapter is not None and adapter.kind == "prefix" else 0

    @staticmethod
    def _padding_groups(widths: list[int], max_waste: float = 0.25) -> list[int]:
        """Sizes of consecutive groups of `widths` (sorted longest first) whose padded area exceeds
        their real tokens by at most `max_waste`."""
        groups, start = [], 0
        for i in range(1, len(widths) + 1):
            if i == len(widths) or widths[start] * (i + 1 - start) > (1 + max_waste) * sum(widths[start:i + 1]):
                groups.append(i - start)
                start = i
        return groups

    def _prefill(self, seqs: list[_Sequence], first_slot: int) -> None:
        # Rows with the same prompt and adapter (an RL group, `n` completions of one request) are computed
        # once: the unique rows prefill into the first slots, then each row's KV is copied to its own slot.
        keys = [(tuple(s.prompt), id(s.request.adapter), s.lora_slot) for s in seqs]
        first: dict = {}
        for key, seq in zip(keys, seqs):
            first.setdefault(key, seq)
        if len(first) == len(seqs):
            self._advance(seqs, self._prefill_rows(seqs, first_slot))
            return
        unique, rank = list(first.values()), {k: i for i, k in enumerate(first)}
        logits = self._prefill_rows(unique, first_slot)
        width = max(s.length for s in unique)
        # Backwards is safe: row j's source rank is <= j, and the rows that read slot j come after j.
        for j in reversed(range(len(seqs))):
            if rank[keys[j]] != j:
                self.cache.move(first_slot + rank[keys[j]], first_slot + j, width)
                seqs[j].length = unique[rank[keys[j]]].length
        self._advance(seqs, logits[torch.tensor([rank[k] for k in keys], device=logits.device)])

    def _prefill_rows(self, seqs: list[_Sequence], first_slot: int) -> torch.Tensor:
        """Prefill `seqs` into slots first_slot.. and set their lengths; the logits at each last position."""
        rows = []
        for seq in seqs:
            emb = F.embedding(torch.tensor(seq.prompt, device=self.device), self.weights.embed)
            adapter = seq.request.adapter
            if adapter is not None and adapter.kind == "prompt":
                emb = torch.cat([adapter.prompt.embeddings, emb])
            rows.append(emb)
        lengths = torch.tensor([r.shape[0] for r in rows], device=self.device)
        embeds = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
        lora = self._lora(seqs)
        adapter = seqs[0].request.adapter  # a prefix-tuning adapter is shared by the whole group (see step)
        prefix = adapter.prefix if adapter is not None and adapter.kind == "prefix" else None
        logits = forward.prefill(self.weights, self.cache, embeds, lengths, first_slot, lora, prefix)
        offset = prefix.num_virtual_tokens if prefix is not None else 0
        for seq, n in zip(seqs, lengths.tolist()):
            seq.length = offset + n
        return logits

    def _decode(self, seqs: list[_Sequence]) -> None:
        tokens = torch.tensor([s.generated[-1] for s in seqs], device=self.device)
        positions = torch.tensor([s.length for s in seqs], device=self.device)
        max_len = max(s.length for s in seqs) + 1
        self.cache.ensure_length(max_len)
        lora = self._lora(seqs)
        if self.graphs is not None and lora is None:
            logits = self.graphs.decode(tokens, positions, max_len)
        else:
            logits = forward.decode(self.weights, self.cache, tokens, positions, max_len, lora)
        for seq in seqs:
            seq.length += 1
        self._advance(seqs, logits)

    def _lora(self, seqs: list[_Sequence]):
        if self.registry is None or not any(s.lora_slot for s in seqs):
            return None
        return self.registry.bank.rows(torch.tensor([s.lora_slot for s in seqs], device=self.device))

    def _advance(self, seqs: list[_Sequence], logits: torch.Tensor) -> None:
        """Choose each row's next token and apply the stop rules."""
        live = [j for j, s in enumerate(seqs) if s.finish_reason is None]  # an aborted row still ran; skip it
        if not live:
            return
        choices = choose_tokens(logits[live], [seqs[j].request.params for j in live],
                                [seqs[j].seed for j in live], [seqs[j].prompt for j in live],
                                [seqs[j].generated for j in live])
        for j, choice in zip(live, choices):
            seq = seqs[j]
            token = choice.token
            seq.generated.append(token)
            seq.new_tokens.append(token)
            if seq.request.params.logprobs is not None:
                seq.new_choices.append(choice)
            if token in seq.stop_ids:
                seq.finish_reason = "stop"
            elif seq.tracker is not None and seq.tracker.add(token):
                seq.finish_reason = "stop"
            elif len(seq.generated) >= seq.request.params.max_new_tokens or seq.length + 1 >= self.max_seq_len:
                seq.finish_reason = "length"

    def _report(self, seq: _Sequence) -> Output | None:
        done = seq.finish_reason is not None
        if not done and not seq.request.stream:
            return None
        if seq.tracker is not None:
            if done:
                seq.tracker.flush()
            text = seq.tracker.take_delta(final=done)
        elif done:
            body = seq.generated[:-1] if seq.generated and seq.generated[-1] in seq.stop_ids else seq.generated
            text = decode_continuation(seq.tokenizer, seq.prompt, body)  # as the streamed deltas add up
        else:
            text = ""
        out = Output(seq.request.request_id, text, seq.new_tokens, seq.new_choices, done, seq.finish_reason,
                     prompt_tokens=len(seq.prompt), completion_tokens=len(seq.generated))
        if seq.request.stream or done:
            seq.new_tokens, seq.new_choices = [], []
        return out

    def _compact(self) -> None:
        """Finished rows leave; the last running rows move into their slots."""
        alive = [s for s in self.running if s.finish_reason is None]
        for seq in self.running:
            if seq.finish_reason is not None and seq.request.adapter is not None and self.registry is not None:
                self.registry.release(seq.request.adapter)
        if len(alive) == len(self.running):
            return
        n = len(alive)
        placed: list[_Sequence | None] = [s if s.finish_reason is None else None for s in self.running[:n]]
        movers = [(i, s) for i, s in enumerate(self.running[n:], start=n) if s.finish_reason is None]
        holes = [i for i, s in enumerate(placed) if s is None]
        for hole, (src, seq) in zip(holes, movers):
            self.cache.move(src, hole, seq.length)
            placed[hole] = seq
        self.running = placed  # type: ignore[assignment]

    # ---- convenience: run a list of requests to completion ----

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None,
                 adapters: list[Adapter | None] | None = None) -> list[Completion]:
        params = params or SamplingParams()
        plist = params if isinstance(params, list) else [params] * len(prompts)
        alist = adapters or [None] * len(prompts)
        requests = [Request(p, sp, a) for p, sp, a in zip(prompts, plist, alist)]
        for r in requests:
            self.add(r)
        results: dict[str, Completion] = {}
        while self.has_work():
            for out in self.step():
                if out.error is not None:
                    raise PosttrainError(f"request {out.request_id} failed: {out.error}")
                if out.finished:
                    results[out.request_id] = Completion(out.text, out.token_ids, out.finish_reason, out.logprobs)
        return [results[r.request_id] for r in requests]
