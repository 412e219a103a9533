"""Response bodies in OpenAI's shapes: completions, chat completions, usage, log-probs."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from posttrain.inference.engine import Output
from posttrain.inference.lora import LoraWeights
from posttrain.inference.registry import Adapter
from posttrain.inference.sampling import SamplingParams


@dataclass
class Prepared:
    name: str
    adapter: Adapter | None
    tokenizer: object
    prompts: list[list[int]]
    params: list[SamplingParams]  # one per engine request (prompt x n)
    lora_weights: LoraWeights | None = None  # read while preparing (registry.read_weights), off the engine step


def usage(outputs: list[Output], prep: Prepared) -> dict:
    prompt = sum(len(p) for p in dedupe(prep.prompts))
    completion = sum(o.completion_tokens for o in outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def chat_logprobs(prep: Prepared, choices) -> dict | None:
    if prep.params[0].logprobs is None:
        return None
    tok = prep.tokenizer

    def entry(token: int, logprob: float) -> dict:
        text = tok.decode([token])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [{**entry(c.token, c.logprob),
                         "top_logprobs": [entry(t, lp) for t, lp in (c.top or [])]} for c in choices]}


def completion_logprobs(prep: Prepared, choices) -> dict | None:
    if prep.params[0].logprobs is None:
        return None
    tok = prep.tokenizer
    tokens = [tok.decode([c.token]) for c in choices]
    offsets, pos = [], 0
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": [c.logprob for c in choices],
            "top_logprobs": [{tok.decode([t]): lp for t, lp in (c.top or [])} for c in choices],
            "text_offset": offsets}


def chat_response(prep: Prepared, outputs: list[Output]) -> dict:
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": prep.name,
            "choices": [{"index": i, "message": {"role": "assistant", "content": o.text},
                         "finish_reason": o.finish_reason, "logprobs": chat_logprobs(prep, o.logprobs)}
                        for i, o in enumerate(outputs)],
            "usage": usage(outputs, prep)}


def completion_response(prep: Prepared, outputs: list[Output]) -> dict:
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": prep.name,
            "choices": [{"index": i, "text": o.text, "finish_reason": o.finish_reason,
                         "logprobs": completion_logprobs(prep, o.logprobs)} for i, o in enumerate(outputs)],
            "usage": usage(outputs, prep)}


def dedupe(prompts: list[list[int]]) -> list[list[int]]:
    """The distinct prompts of a request (n copies of one prompt count once in usage, as in OpenAI)."""
    out, last = [], None
    for p in prompts:
        if p is not last:
            out.append(p)
        last = p
    return out
