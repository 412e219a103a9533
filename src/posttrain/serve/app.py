"""The OpenAI-compatible HTTP API over the engine worker: the routers put together.

Every router but /health's requires the API key (auth.py); bodies over --max-body-bytes are refused
before any of them (body_limit.py). Errors use OpenAI's shape (error_responses.py), published as such in
/openapi.json (400 for a bad body, never FastAPI's 422). A generation request goes: the API key ->
a concurrency slot (429) -> the body's fields (400) -> engine_inputs.py (404, 400, 500 for a broken adapter)
-> the engine's check (400) -> the worker -> one JSON body, or SSE chunks as the tokens come.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.openapi.utils import get_openapi

from posttrain.serve.auth import require_api_key
from posttrain.serve.body_limit import BodySizeLimit
from posttrain.serve.error_responses import HANDLERS
from posttrain.serve.routes import adapters, generation, health, metrics, models, vllm_proxy
from posttrain.serve.state import ServerState

schema = APIRouter()


@schema.get("/openapi.json", include_in_schema=False)
async def openapi(request: Request):
    return request.app.openapi()


def create_app(state: ServerState):
    # /openapi.json is served (behind the API key like every route but /health), as FastAPI users expect; the
    # interactive docs pages are not (they load scripts from a CDN).
    app = FastAPI(title="posttrain", docs_url=None, redoc_url=None, openapi_url=None, exception_handlers=HANDLERS)
    app.state.server = state
    app.openapi = lambda: _openapi(app)
    app.include_router(health.router)
    if getattr(state, "backend", "engine") == "vllm":  # generation and adapter loads handed to vLLM's server
        routers = (vllm_proxy.router, vllm_proxy.adapters, models.router, metrics.router)
    else:
        routers = (generation.router, models.router, adapters.router, metrics.router)
    for router in routers:
        app.include_router(router, dependencies=[Depends(require_api_key)])
    app.include_router(schema, dependencies=[Depends(require_api_key)])
    return BodySizeLimit(app, state.settings.max_body_bytes)


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
