"""GET /health: open to probes (no API key); 503 once the engine thread has died."""

from __future__ import annotations

from fastapi import APIRouter

from posttrain.serve.dependencies import State
from posttrain.serve.error_responses import documented, error_response

router = APIRouter(responses=documented(503))


@router.get("/health")
async def health(state: State):
    if not state.worker.alive:
        return error_response(503, "the engine thread is not running", type_="server_error")
    return {"status": "ok"}
