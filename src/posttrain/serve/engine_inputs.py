"""A validated body becomes engine inputs: `model` resolved to the base or an adapter (404), prompts
rendered and tokenized with that model's tokenizer and chat template, the server's limits checked
(limits.py), sampling parameters per engine request (prompt x n), the adapter's weights read.

Runs in a worker thread (routes call it through run_in_threadpool): a megabyte of prompt must not
stall the event loop that answers every other client.
"""

from __future__ import annotations

from posttrain.inference.request_errors import AdapterError, RequestError
from posttrain.inference.registry import Adapter
from posttrain.inference.sampling import SamplingParams
from posttrain.serve import limits
from posttrain.serve.error_responses import AdapterUnavailable
from posttrain.serve.protocol import ChatCompletionRequest, CompletionRequest
from posttrain.serve.responses import Prepared
from posttrain.serve.state import ServerState


def prepare_chat(state: ServerState, body: ChatCompletionRequest) -> Prepared:
    limits.check(state, body, 1)
    adapter, tokenizer, template = _resolve(state, body.model)
    template = template or state.chat_template  # an adapter without its own renders as the base does
    if not template:
        raise RequestError(f"model {body.model!r} has no chat template; use /v1/completions with a raw prompt "
                           "(or start the server with --template)", param="model")
    try:
        text = tokenizer.apply_chat_template(body.chat_messages(), chat_template=template, tokenize=False,
                                             add_generation_prompt=True)
    except Exception as err:  # a template that rejects these messages (e.g. roles out of order)
        raise RequestError(f"the chat template cannot render these messages: {err}", param="messages") from None
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    limits.check_prompt(state, body, len(ids))
    params = _sampling(state, body, len(ids), adapter, body.wanted_logprobs(),
                       adapter.end_of_turn if adapter is not None else state.end_of_turn)
    return Prepared(body.model, adapter, tokenizer, [ids] * body.n, _seeded(params, body.n),
                    _adapter_weights(state, adapter))


def prepare_completion(state: ServerState, body: CompletionRequest) -> Prepared:
    texts_or_ids = body.prompts()
    limits.check(state, body, len(texts_or_ids))
    adapter, tokenizer, _ = _resolve(state, body.model)
    prompts, params = [], []
    for item in texts_or_ids:
        ids = tokenizer(item, add_special_tokens=True)["input_ids"] if isinstance(item, str) else list(item)
        limits.check_prompt(state, body, len(ids))
        prompts += [ids] * body.n  # n references to one list: usage counts the prompt once (responses.dedupe)
        params += _seeded(_sampling(state, body, len(ids), adapter, body.logprobs), body.n)
    return Prepared(body.model, adapter, tokenizer, prompts, params, _adapter_weights(state, adapter))


def _resolve(state: ServerState, name: str) -> tuple[Adapter | None, object, str | None]:
    if name == state.base_name:
        return None, state.tokenizer, None
    adapter = state.registry.get(name)  # UnknownModel -> 404; never a silent fall back to the base
    return adapter, adapter.tokenizer, adapter.chat_template


def _sampling(state: ServerState, body, prompt_len: int, adapter: Adapter | None, logprobs: int | None,
              end_of_turn: list[int] = ()) -> SamplingParams:
    virtual = adapter.virtual_tokens if adapter is not None else 0
    stop_ids = list(body.stop_token_ids or [])
    if not body.ignore_eos:  # the template's end of turn ends a chat answer as EOS does
        stop_ids += [t for t in end_of_turn if t not in stop_ids]
    return SamplingParams(
        max_new_tokens=limits.max_new_tokens(state, body, prompt_len, virtual), temperature=body.temperature,
        top_p=body.top_p, top_k=body.top_k, repetition_penalty=body.repetition_penalty,
        presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty, stop=body.stop_list(),
        stop_token_ids=stop_ids, ignore_eos=body.ignore_eos, seed=body.seed, logprobs=logprobs)


def _seeded(params: SamplingParams, n: int) -> list[SamplingParams]:
    """n copies of `params`; a seeded request's copies get seeds seed, seed+1, ... (else n equal texts)."""
    if n == 1 or params.seed is None:
        return [params] * n
    return [SamplingParams(**{**params.__dict__, "seed": params.seed + i}) for i in range(n)]


def _adapter_weights(state: ServerState, adapter: Adapter | None):
    """The adapter's LoRA weights, read and checked here, off the engine step: a file broken since
    registration fails this request alone (the engine thread never meets it, see engine._admit)."""
    if adapter is None:
        return None
    try:
        return state.registry.read_weights(adapter)
    except AdapterError as err:
        raise AdapterUnavailable(str(err)) from None
