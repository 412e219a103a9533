"""The limits that depend on this server: its flags (--max-n, --max-prompt-tokens, --max-tokens-limit)
and its model's context, all checked here (the request before its prompts are tokenized, each prompt
after). The limits that hold on any server are constraints on the request fields (protocol.py);
whether prompt plus completion fit the context is the engine's own check (`Engine.check`)."""

from __future__ import annotations

from posttrain.inference.request_errors import RequestError
from posttrain.serve.protocol import ChatCompletionRequest
from posttrain.serve.state import ServerState


def max_prompt_tokens(state: ServerState) -> int:
    return state.settings.max_prompt_tokens or state.max_model_len - 1


def max_tokens_limit(state: ServerState) -> int:
    return state.settings.max_tokens_limit or state.max_model_len


def check(state: ServerState, body, prompt_count: int) -> None:
    """Raise RequestError (400, naming the field) unless `body` with its `prompt_count` distinct prompts is
    within this server's limits; before tokenizing, so an oversized batch costs no tokenizer time."""
    max_n = state.settings.max_n
    if body.n > max_n:
        raise RequestError(f"n must be between 1 and {max_n}", param="n")
    if prompt_count * body.n > max_n * 4:
        raise RequestError(f"give between 1 and {max_n * 4} prompts x n", param="prompt")
    asked = body.asked_max_tokens
    if asked is not None and asked > max_tokens_limit(state):
        raise RequestError(f"max_tokens is {asked}; this server allows at most {max_tokens_limit(state)}",
                           param="max_tokens")


def check_prompt(state: ServerState, body, length: int) -> None:
    """Raise RequestError unless a tokenized prompt of `length` tokens is within --max-prompt-tokens."""
    if length > max_prompt_tokens(state):
        raise RequestError(f"the prompt has {length} tokens; this server accepts at most {max_prompt_tokens(state)}",
                           param="messages" if isinstance(body, ChatCompletionRequest) else "prompt")


def max_new_tokens(state: ServerState, body, prompt_len: int, virtual_tokens: int) -> int:
    """The completion's length budget: what the client asked, else what is left of the context (capped)."""
    if body.asked_max_tokens is not None:
        return body.asked_max_tokens
    return min(max_tokens_limit(state), state.max_model_len - virtual_tokens - prompt_len)
