"""POST /v1/completions and /v1/chat/completions: a body is prepared (engine_inputs.py, off the event loop),
checked by the engine and submitted (engine_requests.py); the answer is one JSON body once every choice
finished, or SSE chunks as the tokens come (streaming.py)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from posttrain.errors import ConfigError
from posttrain.inference.request_errors import RequestError, UnknownModel
from posttrain.serve.dependencies import GenerationSlot, State
from posttrain.serve.error_responses import AdapterUnavailable, documented, status_of
from posttrain.serve.engine_inputs import prepare_chat, prepare_completion
from posttrain.serve.engine_requests import complete, engine_requests, record, submit
from posttrain.serve.protocol import ChatCompletionRequest, CompletionRequest
from posttrain.serve.responses import chat_response, completion_response
from posttrain.serve.streaming import sse
from posttrain.serve.worker import EngineFailed

router = APIRouter(responses=documented(400, 401, 404, 413, 429, 500))


@router.post("/v1/chat/completions")
async def chat(body: ChatCompletionRequest, state: State, slot: GenerationSlot):
    return await _generate(state, slot, body, prepare_chat, "chat")


@router.post("/v1/completions")
async def completions(body: CompletionRequest, state: State, slot: GenerationSlot):
    return await _generate(state, slot, body, prepare_completion, "completions")


async def _generate(state, slot, body, prepare, endpoint: str):
    try:
        prep = await run_in_threadpool(prepare, state, body)  # templates and tokenizers: off the event loop
        requests = engine_requests(state, prep, stream=body.stream)
    except (RequestError, UnknownModel, ConfigError, AdapterUnavailable) as err:
        # unknown names share one label: client-chosen strings must not grow the metric set without bound
        state.metrics.record(body.model if state.serves(body.model) else "<unknown>", endpoint, status_of(err))
        raise
    sink = submit(state, requests)
    if body.stream:
        return StreamingResponse(sse(state, body, prep, sink, requests, endpoint, slot),
                                 media_type="text/event-stream")
    try:
        outputs = await complete(state, sink, requests)
    except EngineFailed:
        record(state, prep, endpoint, 500, [], requests, slot)
        raise
    record(state, prep, endpoint, 200, outputs, requests, slot)
    return (chat_response if endpoint == "chat" else completion_response)(prep, outputs)
