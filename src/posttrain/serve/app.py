"""The OpenAI-compatible HTTP API over the engine worker.

A generation request goes: limits (429) -> `model` to base or adapter (404) -> prompt tokens with
that model's tokenizer and chat template -> limits on prompt and max_tokens (400) -> the adapter's
weights read from disk (500 naming the adapter if its files broke since registration) ->
`engine.check` (400) -> the worker, `n` engine requests sharing one output queue -> a JSON body, or
SSE chunks as the tokens come. Errors use OpenAI's shape: {"error": {"message", "type", "param",
"code"}}, published as such in /openapi.json (400 for a bad body, never FastAPI's 422).

Preparing a request (template rendering, tokenization, reading adapter files) runs in a worker
thread: a megabyte of prompt must not stall the event loop that answers every other client.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from posttrain.errors import ConfigError
from posttrain.inference.engine import Engine, Output, Request
from posttrain.inference.errors import AdapterError, ProtectedAdapter, RequestError, RequestTooLarge, UnknownModel
from posttrain.inference.registry import Adapter, AdapterRegistry, validate_name
from posttrain.inference.sampling import SamplingParams
from posttrain.serve.guards import Guard
from posttrain.serve.metrics import Metrics
from posttrain.serve.protocol import (ChatCompletionRequest, CompletionRequest, ErrorResponse, LoadAdapterRequest,
                                      UnloadAdapterRequest, error_body)
from posttrain.serve.responses import (Prepared, chat_logprobs, chat_response, completion_logprobs,
                                       completion_response, dedupe, usage)
from posttrain.serve.settings import ServeSettings
from posttrain.serve.worker import EngineFailed, EngineWorker


class TooManyRequests(Exception):
    pass


class AdapterUnavailable(Exception):
    """A registered adapter's files can no longer be read (changed on disk since): HTTP 500 for its requests."""


def _responses(*statuses: int) -> dict:
    """The error answers of a route, for /openapi.json."""
    return {status: {"model": ErrorResponse, "description": ERROR_STATUSES[status]} for status in statuses}


ERROR_STATUSES = {400: "Invalid request (body, field or value); `param` names the field",
                  401: "Missing or wrong API key",
                  403: "Not allowed on this server", 404: "Unknown model", 413: "Request body too large",
                  429: "Too many concurrent requests", 500: "Server or adapter failure"}
GENERATE_ERRORS = _responses(400, 401, 404, 413, 429, 500)
ADAPTER_ERRORS = _responses(400, 401, 403, 404, 413)


@dataclass
class ServerState:
    settings: ServeSettings
    engine: Engine
    worker: EngineWorker
    registry: AdapterRegistry
    tokenizer: object
    base_name: str
    metrics: Metrics
    created: int
    in_flight: int = 0
    chat_template: str | None = None  # the base's (--template, else its own); also for adapters that ship none
    end_of_turn: list[int] = field(default_factory=list)  # its end-of-turn token: chats stop there too

    @property
    def max_model_len(self) -> int:
        return self.engine.max_seq_len

    @property
    def max_prompt_tokens(self) -> int:
        return self.settings.max_prompt_tokens or self.max_model_len - 1

    @property
    def max_tokens_limit(self) -> int:
        return self.settings.max_tokens_limit or self.max_model_len


def _error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
           code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status)


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema without the 422 it adds to every route with a body: this server answers 400 instead."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        for unused in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(unused, None)
        app.openapi_schema = schema
    return app.openapi_schema


def create_app(state: ServerState):
    # /openapi.json is served (behind the API key like every route but /health), as FastAPI users expect; the
    # interactive docs pages are not (they load scripts from a CDN).
    app = FastAPI(title="posttrain", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.openapi = lambda: _openapi(app)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        return _error(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}", param=where)

    @app.exception_handler(RequestTooLarge)
    async def _too_long(_, err: RequestTooLarge):
        return _error(400, str(err), param=err.param, code="context_length_exceeded")

    @app.exception_handler(RequestError)
    async def _bad(_, err: RequestError):
        return _error(400, str(err), param=err.param)

    @app.exception_handler(UnknownModel)
    async def _unknown(_, err: UnknownModel):
        return _error(404, f"The model `{err.name}` does not exist.", param="model", code="model_not_found")

    @app.exception_handler(ConfigError)
    async def _config(_, err: ConfigError):
        return _error(400, str(err))

    @app.exception_handler(ProtectedAdapter)
    async def _protected(_, err: ProtectedAdapter):
        return _error(403, str(err), param="lora_name", code="forbidden")

    @app.exception_handler(AdapterUnavailable)
    async def _adapter_broken(_, err: AdapterUnavailable):
        return _error(500, str(err), type_="server_error", param="model", code="adapter_unavailable")

    @app.exception_handler(Exception)
    async def _bug(_, err: Exception):  # still logged with its traceback by the server; the client gets one line
        return _error(500, f"the server failed on this request ({type(err).__name__}); see the server log",
                      type_="server_error")

    @app.exception_handler(TooManyRequests)
    async def _busy(_, err: TooManyRequests):
        return _error(429, str(err), type_="rate_limit_error", code="too_many_requests")

    @app.exception_handler(EngineFailed)
    async def _failed(_, err: EngineFailed):
        return _error(500, str(err), type_="server_error")

    # ---- model resolution and request preparation ----

    def resolve(name: str) -> tuple[Adapter | None, object, str | None]:
        if name == state.base_name:
            return None, state.tokenizer, None
        adapter = state.registry.get(name)  # UnknownModel -> 404; never a silent fall back to the base
        return adapter, adapter.tokenizer, adapter.chat_template

    def sampling(body, prompt_len: int, adapter: Adapter | None, logprobs: int | None,
                 end_of_turn: list[int] = ()) -> SamplingParams:
        virtual = adapter.prompt.num_virtual_tokens if adapter is not None and adapter.kind == "prompt" else 0
        if prompt_len > state.max_prompt_tokens:
            raise RequestError(f"the prompt has {prompt_len} tokens; this server accepts at most "
                               f"{state.max_prompt_tokens}", param="messages" if hasattr(body, "messages") else "prompt")
        asked = getattr(body, "max_completion_tokens", None) or body.max_tokens
        if asked is not None and asked > state.max_tokens_limit:
            raise RequestError(f"max_tokens is {asked}; this server allows at most {state.max_tokens_limit}",
                               param="max_tokens")
        max_new = asked if asked is not None else min(state.max_tokens_limit,
                                                      state.max_model_len - prompt_len - virtual)
        stop_ids = list(body.stop_token_ids or [])
        if not body.ignore_eos:  # the template's end of turn ends a chat answer as EOS does
            stop_ids += [t for t in end_of_turn if t not in stop_ids]
        return SamplingParams(
            max_new_tokens=max_new, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
            repetition_penalty=body.repetition_penalty, presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty, stop=body.stop_list(),
            stop_token_ids=stop_ids, ignore_eos=body.ignore_eos, seed=body.seed,
            logprobs=logprobs)

    def check_n(body) -> None:
        if not 1 <= body.n <= state.settings.max_n:
            raise RequestError(f"n must be between 1 and {state.settings.max_n}", param="n")

    def prepare_chat(body: ChatCompletionRequest) -> Prepared:
        body.refuse_unsupported()
        check_n(body)
        adapter, tokenizer, template = resolve(body.model)
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
        params = sampling(body, len(ids), adapter, body.wanted_logprobs(),
                          adapter.end_of_turn if adapter is not None else state.end_of_turn)
        return Prepared(body.model, adapter, tokenizer, [ids] * body.n, _seeded(params, body.n),
                        adapter_weights(adapter))

    def prepare_completion(body: CompletionRequest) -> Prepared:
        body.refuse_unsupported()
        check_n(body)
        adapter, tokenizer, _ = resolve(body.model)
        prompt = body.prompt
        if isinstance(prompt, str):
            texts_or_ids = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            texts_or_ids = [prompt]
        else:
            texts_or_ids = list(prompt)
        if not texts_or_ids or len(texts_or_ids) * body.n > state.settings.max_n * 4:
            raise RequestError(f"give between 1 and {state.settings.max_n * 4} prompts x n", param="prompt")
        prompts, params = [], []
        for item in texts_or_ids:
            ids = tokenizer(item, add_special_tokens=True)["input_ids"] if isinstance(item, str) else list(item)
            p = sampling(body, len(ids), adapter, body.logprobs)
            prompts += [ids] * body.n
            params += _seeded(p, body.n)
        return Prepared(body.model, adapter, tokenizer, prompts, params, adapter_weights(adapter))

    def adapter_weights(adapter: Adapter | None):
        """The adapter's LoRA weights, read and checked here, off the engine step: a file broken since
        registration fails this request alone (the engine thread never meets it, see engine._admit)."""
        if adapter is None:
            return None
        try:
            return state.registry.read_weights(adapter)
        except AdapterError as err:
            raise AdapterUnavailable(str(err)) from None

    def _seeded(params: SamplingParams, n: int) -> list[SamplingParams]:
        if n == 1 or params.seed is None:
            return [params] * n
        return [SamplingParams(**{**params.__dict__, "seed": params.seed + i}) for i in range(n)]

    async def launch(prep: Prepared) -> tuple[asyncio.Queue, list[Request]]:
        requests = [Request(ids, p, prep.adapter, stream=True, lora_weights=prep.lora_weights)
                    for ids, p in zip(prep.prompts, prep.params)]
        for r in requests:
            state.engine.check(r)
        sink: asyncio.Queue = asyncio.Queue()
        for i, r in enumerate(requests):
            state.worker.submit(r, sink, tag=i)
        return sink, requests

    def admit() -> None:
        if state.in_flight >= state.settings.max_concurrent_requests:
            raise TooManyRequests(f"the server is at its limit of {state.settings.max_concurrent_requests} "
                                  "concurrent requests; retry later")
        state.in_flight += 1

    # ---- routes ----

    @app.get("/health")
    async def health():
        if not state.worker.alive:
            return _error(503, "the engine thread is not running", type_="server_error")
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        data = [{"id": state.base_name, "object": "model", "created": state.created, "owned_by": "posttrain",
                 "root": state.base_name, "parent": None, "max_model_len": state.max_model_len}]
        for a in state.registry.list():
            data.append({"id": a.name, "object": "model", "created": a.created, "owned_by": "posttrain",
                         "root": a.name, "parent": state.base_name, "adapter_type": a.kind})
        return {"object": "list", "data": data}

    @app.get("/metrics")
    async def metrics():
        gauges = {**state.worker.load(), "in_flight_requests": state.in_flight,
                  "resident_lora_adapters": len(state.registry.resident()),
                  "registered_adapters": len(state.registry.list())}
        return PlainTextResponse(state.metrics.render(gauges), media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions", responses=GENERATE_ERRORS)
    async def chat(body: ChatCompletionRequest):
        return await generate(body, prepare_chat, "chat")

    @app.post("/v1/completions", responses=GENERATE_ERRORS)
    async def completions(body: CompletionRequest):
        return await generate(body, prepare_completion, "completions")

    async def generate(body, prepare, endpoint: str):
        admit()
        started = time.perf_counter()
        handed_off = False
        try:
            try:
                prep = await run_in_threadpool(prepare, body)  # templates and tokenizers: off the event loop
                sink, requests = await launch(prep)
            except (RequestError, UnknownModel, ConfigError, AdapterUnavailable) as err:
                status = 404 if isinstance(err, UnknownModel) else 500 if isinstance(err, AdapterUnavailable) else 400
                # unknown names share one label: client-chosen strings must not grow the metric set without bound
                known = body.model == state.base_name or body.model in {a.name for a in state.registry.list()}
                state.metrics.record(body.model if known else "<unknown>", endpoint, status)
                raise
            if body.stream:
                handed_off = True
                return StreamingResponse(stream(body, prep, sink, requests, endpoint, started),
                                         media_type="text/event-stream")
            outputs = await collect(sink, len(requests))
            state.metrics.record(body.model, endpoint, 200, sum(len(p) for p in prep.prompts),
                                 sum(o.completion_tokens for o in outputs), time.perf_counter() - started)
            return (chat_response if endpoint == "chat" else completion_response)(prep, outputs)
        finally:
            if not handed_off:
                state.in_flight -= 1

    async def collect(sink: asyncio.Queue, count: int) -> list[Output]:
        texts: dict[int, list[str]] = {i: [] for i in range(count)}
        tokens: dict[int, list] = {i: [] for i in range(count)}
        logprobs: dict[int, list] = {i: [] for i in range(count)}
        done: dict[int, Output] = {}
        while len(done) < count:
            tag, item = await sink.get()
            if isinstance(item, Exception):
                raise item
            if item.error is not None:
                raise EngineFailed(item.error)
            texts[tag].append(item.text)
            tokens[tag] += item.token_ids
            logprobs[tag] += item.logprobs
            if item.finished:
                done[tag] = item
        return [Output(done[i].request_id, "".join(texts[i]), tokens[i], logprobs[i], True, done[i].finish_reason,
                       done[i].prompt_tokens, done[i].completion_tokens) for i in range(count)]

    async def stream(body, prep: Prepared, sink: asyncio.Queue, requests: list[Request], endpoint: str,
                     started: float):
        chat_mode = endpoint == "chat"
        rid = f"{'chatcmpl' if chat_mode else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        kind = "chat.completion.chunk" if chat_mode else "text_completion"

        def chunk(choices: list[dict], **extra) -> str:
            return "data: " + json.dumps({"id": rid, "object": kind, "created": created, "model": prep.name,
                                          "choices": choices, **extra}) + "\n\n"

        finished: dict[int, Output] = {}
        status = 200
        try:
            if chat_mode:
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                              "logprobs": None} for i in range(len(requests))])
            while len(finished) < len(requests):
                tag, item = await sink.get()
                if not isinstance(item, Exception) and item.error is not None:
                    item = EngineFailed(item.error)
                if isinstance(item, Exception):
                    status = 500
                    yield "data: " + json.dumps(error_body(str(item), "server_error")) + "\n\n"
                    return
                if not (item.text or item.finished or item.logprobs):
                    continue
                if chat_mode:
                    choice = {"index": tag, "delta": {"content": item.text} if item.text else {},
                              "logprobs": chat_logprobs(prep, item.logprobs) if item.logprobs else None,
                              "finish_reason": item.finish_reason}
                else:
                    choice = {"index": tag, "text": item.text, "finish_reason": item.finish_reason,
                              "logprobs": completion_logprobs(prep, item.logprobs) if item.logprobs else None}
                yield chunk([choice])
                if item.finished:
                    finished[tag] = item
            if body.stream_options is not None and body.stream_options.include_usage:
                yield chunk([], usage=usage([finished[i] for i in range(len(requests))], prep))
            yield "data: [DONE]\n\n"
        finally:
            for i, r in enumerate(requests):
                if i not in finished:  # the client left (or an error): free the rows now
                    state.worker.abort(r.request_id)
            done = list(finished.values())
            state.metrics.record(prep.name, endpoint, status if len(done) == len(requests) else 499,
                                 sum(len(p) for p in dedupe(prep.prompts)), sum(o.completion_tokens for o in done),
                                 time.perf_counter() - started if status == 200 else None)
            state.in_flight -= 1

    # ---- runtime adapters ----

    def runtime_allowed() -> None:
        if not state.settings.allow_runtime_adapters:
            raise PermissionError

    @app.exception_handler(PermissionError)
    async def _forbidden(_, __):
        return _error(403, "runtime adapter loading is disabled on this server; start it with "
                           "--allow-runtime-adapters (and --adapter-dir for the folders it may load from)",
                      code="forbidden")

    @app.post("/v1/load_lora_adapter", responses=ADAPTER_ERRORS)
    async def load_adapter(body: LoadAdapterRequest):
        runtime_allowed()
        validate_name(body.lora_name)
        try:
            adapter = await run_in_threadpool(state.registry.add, body.lora_name, body.lora_path, runtime=True)
        except AdapterError as err:
            return _error(400, str(err), param="lora_path")
        return {"object": "adapter", "id": adapter.name, "parent": state.base_name, "adapter_type": adapter.kind,
                "status": "loaded"}

    @app.post("/v1/unload_lora_adapter", responses=ADAPTER_ERRORS)
    async def unload_adapter(body: UnloadAdapterRequest):
        runtime_allowed()
        adapter = state.registry.remove(body.lora_name, runtime_only=True)  # the operator's stay
        return {"object": "adapter", "id": adapter.name, "status": "unloaded"}

    return Guard(app, state.settings.api_keys, state.settings.max_body_bytes)

