"""A streaming answer: server-sent events in OpenAI's chunk shapes, one chunk per engine output.

A chat stream opens with the assistant role; each choice then sends its text deltas (and log-probs)
and its finish reason; `stream_options.include_usage` adds a last chunk with the usage; then
`[DONE]`. An engine failure mid-stream is sent as an error event (the status line is long gone).
When the client leaves, the unfinished rows are aborted at once.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from posttrain.inference.engine import Output, Request
from posttrain.serve.dependencies import Slot
from posttrain.serve.engine_requests import abort_unfinished, record
from posttrain.serve.protocol import error_body
from posttrain.serve.responses import Prepared, chat_logprobs, completion_logprobs, usage
from posttrain.serve.state import ServerState
from posttrain.serve.worker import EngineFailed


async def sse(state: ServerState, body, prep: Prepared, sink: asyncio.Queue, requests: list[Request],
              endpoint: str, slot: Slot):
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
            yield chunk([_choice(prep, chat_mode, tag, item)])
            if item.finished:
                finished[tag] = item
        if body.stream_options is not None and body.stream_options.include_usage:
            yield chunk([], usage=usage([finished[i] for i in range(len(requests))], prep))
        yield "data: [DONE]\n\n"
    finally:
        abort_unfinished(state, requests, finished)
        left = status == 200 and len(finished) < len(requests)  # the client went away mid-stream
        record(state, prep, endpoint, 499 if left else status, list(finished.values()), requests, slot)


def _choice(prep: Prepared, chat_mode: bool, index: int, item: Output) -> dict:
    if chat_mode:
        return {"index": index, "delta": {"content": item.text} if item.text else {},
                "logprobs": chat_logprobs(prep, item.logprobs) if item.logprobs else None,
                "finish_reason": item.finish_reason}
    return {"index": index, "text": item.text, "finish_reason": item.finish_reason,
            "logprobs": completion_logprobs(prep, item.logprobs) if item.logprobs else None}
