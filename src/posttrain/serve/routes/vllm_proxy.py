"""The generation and adapter routes of `serve --backend vllm` (serve/vllm_server.py): checked here as the
engine's routes check them, then handed to vLLM's server; its answer (a JSON body, or SSE chunks as they
come) goes back as vLLM gave it, with its status."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask

from posttrain.inference.registry import validate_name
from posttrain.inference.request_errors import AdapterError, RequestError, UnknownModel
from posttrain.serve import limits
from posttrain.serve.dependencies import GenerationSlot, State, runtime_adapters_allowed
from posttrain.serve.error_responses import documented
from posttrain.serve.protocol import (ChatCompletionRequest, CompletionRequest, LoadAdapterRequest,
                                      UnloadAdapterRequest)

router = APIRouter(responses=documented(400, 401, 404, 413, 429, 500))
adapters = APIRouter(dependencies=[Depends(runtime_adapters_allowed)], responses=documented(400, 401, 403, 404, 413))


def _client(state):
    """One connection pool to vLLM per server, opened on the event loop that uses it."""
    if state.client is None:
        import httpx

        state.client = httpx.AsyncClient(base_url=state.worker.url, timeout=None)
    return state.client


@router.post("/v1/chat/completions")
async def chat(body: ChatCompletionRequest, request: Request, state: State, slot: GenerationSlot):
    return await _forward(state, request, body, "chat", 1)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, state: State, slot: GenerationSlot):
    return await _forward(state, request, body, "completions", len(body.prompts()))


async def _forward(state, request: Request, body, endpoint: str, prompt_count: int):
    started = time.perf_counter()
    try:
        if not state.serves(body.model):
            raise UnknownModel(body.model)
        limits.check(state, body, prompt_count)
    except (RequestError, UnknownModel) as err:
        state.metrics.record(body.model if state.serves(body.model) else "<unknown>", endpoint,
                             404 if isinstance(err, UnknownModel) else 400)
        raise
    payload = await request.json()  # as the client sent it: vLLM reads every field it knows
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    client = _client(state)
    if body.stream:
        upstream = await client.send(client.build_request("POST", path, json=payload), stream=True)
        state.metrics.record(body.model, endpoint, upstream.status_code)
        return StreamingResponse(upstream.aiter_raw(), status_code=upstream.status_code,
                                 media_type=upstream.headers.get("content-type", "text/event-stream"),
                                 background=BackgroundTask(upstream.aclose))
    upstream = await client.post(path, json=payload)
    answer = upstream.json()
    usage = answer.get("usage") or {}
    state.metrics.record(body.model, endpoint, upstream.status_code, usage.get("prompt_tokens", 0),
                         usage.get("completion_tokens", 0), time.perf_counter() - started)
    return JSONResponse(answer, status_code=upstream.status_code)


@adapters.post("/v1/load_lora_adapter")
async def load_adapter(body: LoadAdapterRequest, state: State):
    validate_name(body.lora_name)
    try:  # this server's path rules and checks first; vLLM then reads the folder this server resolved
        adapter = await run_in_threadpool(state.registry.add, body.lora_name, body.lora_path, runtime=True)
    except AdapterError as err:
        raise RequestError(str(err), param="lora_path") from None
    upstream = await _client(state).post("/v1/load_lora_adapter",
                                         json={"lora_name": adapter.name, "lora_path": str(adapter.path)})
    if upstream.status_code != 200:
        state.registry.remove(adapter.name)
        raise RequestError(f"vLLM could not load adapter {adapter.name!r}: {upstream.text.strip()[:300]}",
                           param="lora_path")
    return {"object": "adapter", "id": adapter.name, "parent": state.base_name, "adapter_type": adapter.kind,
            "status": "loaded"}


@adapters.post("/v1/unload_lora_adapter")
async def unload_adapter(body: UnloadAdapterRequest, state: State):
    adapter = state.registry.remove(body.lora_name, runtime_only=True)  # the operator's stay
    await _client(state).post("/v1/unload_lora_adapter", json={"lora_name": adapter.name})
    return {"object": "adapter", "id": adapter.name, "status": "unloaded"}
