"""What routes ask FastAPI for: the server's state, a generation slot, permission to change adapters."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from posttrain.serve.error_responses import RuntimeAdaptersDisabled, TooManyRequests
from posttrain.serve.state import ServerState


async def get_state(request: Request) -> ServerState:
    # async: FastAPI runs a plain `def` dependency in its thread pool, a thread hop on every request
    return request.app.state.server


State = Annotated[ServerState, Depends(get_state)]


@dataclass
class Slot:
    admitted_at: float  # time.perf_counter() when the request was admitted (the start of its queue time)


async def generation_slot(state: State):
    """One of --max-concurrent-requests, held until the answer is sent, a stream's last chunk included
    (FastAPI exits a yield dependency after the response)."""
    if state.in_flight >= state.settings.max_concurrent_requests:
        raise TooManyRequests(f"the server is at its limit of {state.settings.max_concurrent_requests} "
                              "concurrent requests; retry later")
    state.in_flight += 1
    try:
        yield Slot(time.perf_counter())
    finally:
        state.in_flight -= 1


GenerationSlot = Annotated[Slot, Depends(generation_slot)]


async def runtime_adapters_allowed(state: State) -> None:
    if not state.settings.allow_runtime_adapters:
        raise RuntimeAdaptersDisabled()
