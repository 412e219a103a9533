"""transformers' `generate` as a generation backend: every model transformers runs, slower.

It reads the model's live parameters, like the engine. Per-request seeds keep their meaning: a
seeded sampled request is generated on its own, under a generator seeded with its seed, so its sample
does not depend on what else was asked (greedy and unseeded requests are batched, left-padded).
Log-probs are those of the raw logits, as the engine and the OpenAI API report them. What `generate`
has no equivalent for (stop strings, presence and frequency penalties) is refused, never ignored.
"""

from __future__ import annotations

import torch

from posttrain.errors import ConfigError
from posttrain.generation.backend import Completion, GeneratesHere, model_device, stop_ids_of
from posttrain.inference.detokenize import decode_continuation
from posttrain.inference.sampling import SamplingParams, TokenChoice


class HFBackend(GeneratesHere):
    name = "hf"

    def __init__(self, model, tokenizer, *, max_batch_size: int = 32):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size = max_batch_size
        self.max_seq_len = getattr(getattr(model, "config", None), "max_position_embeddings", None) or 2048
        self.stop_ids = stop_ids_of(model, tokenizer)

    def generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[Completion]:
        for p in params:
            if p.stop or p.presence_penalty or p.frequency_penalty:
                raise ConfigError("the transformers generate backend has no stop strings or presence/frequency "
                                  "penalties; use the engine or vLLM backend for them")
        out: list[Completion | None] = [None] * len(prompts)
        alone = [i for i, p in enumerate(params) if not p.greedy and p.seed is not None]
        batched = [i for i in range(len(prompts)) if i not in set(alone)]
        groups: dict = {}
        for i in batched:  # one generate call per distinct set of parameters, in batches
            groups.setdefault(repr(params[i]), []).append(i)
        was_training = self.model.training
        self.model.eval()
        try:
            for idx in groups.values():
                idx.sort(key=lambda i: len(prompts[i]))  # similar lengths: less padding
                for start in range(0, len(idx), self.max_batch_size):
                    rows = idx[start:start + self.max_batch_size]
                    for i, c in zip(rows, self._run([prompts[i] for i in rows], params[rows[0]])):
                        out[i] = c
            for i in alone:
                with torch.random.fork_rng(devices=[model_device(self.model)] if model_device(
                        self.model).type == "cuda" else []):
                    torch.manual_seed(params[i].seed)
                    out[i] = self._run([prompts[i]], params[i])[0]
        finally:
            self.model.train(was_training)
        return out  # type: ignore[return-value]

    @torch.no_grad()
    def _run(self, prompts: list[list[int]], p: SamplingParams) -> list[Completion]:
        tok, device = self.tokenizer, model_device(self.model)
        stops = set(p.stop_token_ids) | (set() if p.ignore_eos else self.stop_ids)
        width = max(len(x) for x in prompts)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, x in enumerate(prompts):  # left-padded: every row generates from the same column
            ids[row, width - len(x):] = torch.tensor(x)
            mask[row, width - len(x):] = 1
        room = max(1, self.max_seq_len - width)
        kwargs = dict(max_new_tokens=min(p.max_new_tokens, room), pad_token_id=pad, do_sample=not p.greedy,
                      eos_token_id=sorted(stops) or None, return_dict_in_generate=True,
                      output_logits=p.logprobs is not None)
        if not p.greedy:
            kwargs.update(temperature=p.temperature, top_p=p.top_p, top_k=p.top_k or None)
        if p.repetition_penalty != 1:
            kwargs["repetition_penalty"] = p.repetition_penalty
        gen = self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
        new = gen.sequences[:, width:].tolist()
        done = []
        for row, (x, tokens) in enumerate(zip(prompts, new)):
            stop = next((k for k, t in enumerate(tokens) if t in stops), None)
            kept = tokens[:stop + 1] if stop is not None else tokens
            body = kept[:-1] if stop is not None else kept
            choices = []
            if p.logprobs is not None:
                for k, t in enumerate(kept):
                    logp = torch.log_softmax(gen.logits[k][row].float(), -1)
                    top = logp.topk(p.logprobs) if p.logprobs else None
                    choices.append(TokenChoice(t, logp[t].item(), list(zip(top.indices.tolist(), top.values.tolist()))
                                               if top is not None else None))
            done.append(Completion(decode_continuation(tok, x, body), kept,
                                   "stop" if stop is not None else "length", choices))
        return done

    def update_weights(self) -> None:
        """Nothing to send: generate reads the live parameters."""

    def close(self) -> None:
        self.model = None
