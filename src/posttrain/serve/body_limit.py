"""The body-size limit: a request body over --max-body-bytes is refused (413) before any route reads it.

Plain ASGI (not Starlette's BaseHTTPMiddleware) so streamed responses pass through untouched. The
limit is enforced twice: a declared Content-Length over the limit is refused before reading, and a
chunked body is cut off as soon as it grows past the limit (bodies are read here, whole, and
replayed to the route). The API key is checked later, by the routers (auth.py).
"""

from __future__ import annotations

import json

from posttrain.serve.protocol import error_body


async def _send_json(send, status: int, body: dict) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


class BodySizeLimit:
    def __init__(self, app, max_body_bytes: int):
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_large = error_body(f"request body larger than {self.max_body_bytes} bytes", code="request_too_large")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return await _send_json(send, 413, too_large)
        # Read the whole (bounded) body here, then replay it: a route never sees a body over the limit.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return await _send_json(send, 413, too_large)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # afterwards: wait for the disconnect, as Starlette expects

        await self.app(scope, replay, send)
