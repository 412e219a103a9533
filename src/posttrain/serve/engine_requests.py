"""Prepared requests on the engine thread: checked and submitted, their outputs collected, the outcome
recorded in the metrics. Streaming answers read the same queue chunk by chunk (streaming.py)."""

from __future__ import annotations

import asyncio
import time

from posttrain.inference.engine import Output, Request
from posttrain.serve.dependencies import Slot
from posttrain.serve.responses import Prepared, dedupe
from posttrain.serve.state import ServerState
from posttrain.serve.worker import EngineFailed


def engine_requests(state: ServerState, prep: Prepared, stream: bool) -> list[Request]:
    """One engine request per prompt x n, each checked by the engine (400s here, before any is queued)."""
    requests = [Request(ids, p, prep.adapter, stream=stream, lora_weights=prep.lora_weights)
                for ids, p in zip(prep.prompts, prep.params)]
    for r in requests:
        state.engine.check(r)
    return requests


def submit(state: ServerState, requests: list[Request]) -> asyncio.Queue:
    """Hand `requests` to the engine thread; their outputs arrive on the returned queue as (index, Output)."""
    sink: asyncio.Queue = asyncio.Queue()
    for i, r in enumerate(requests):
        state.worker.submit(r, sink, tag=i)
    return sink


async def complete(state: ServerState, sink: asyncio.Queue, requests: list[Request]) -> list[Output]:
    """The finished outputs of non-streaming requests: the engine reports each once, at its end, whole."""
    done: dict[int, Output] = {}
    try:
        while len(done) < len(requests):
            tag, item = await sink.get()
            if isinstance(item, Exception):
                raise item
            if item.error is not None:
                raise EngineFailed(item.error)
            done[tag] = item
    finally:
        abort_unfinished(state, requests, done)
    return [done[i] for i in range(len(requests))]


def abort_unfinished(state: ServerState, requests: list[Request], finished: dict[int, Output]) -> None:
    """Free the engine rows of an answer that ended early (an error, or the client left)."""
    for i, r in enumerate(requests):
        if i not in finished:
            state.worker.abort(r.request_id)


def record(state: ServerState, prep: Prepared, endpoint: str, status: int, finished: list[Output],
           requests: list[Request], slot: Slot) -> None:
    """Count a request that reached the engine: tokens, latency (successes only), queue time and first token."""
    state.metrics.record(prep.name, endpoint, status, sum(len(p) for p in dedupe(prep.prompts)),
                         sum(o.completion_tokens for o in finished),
                         time.perf_counter() - slot.admitted_at if status == 200 else None)
    state.metrics.record_timing(prep.name, slot.admitted_at,
                                min((r.started_at for r in requests if r.started_at is not None), default=None),
                                min((r.first_token_at for r in requests if r.first_token_at is not None), default=None))
