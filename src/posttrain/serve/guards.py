"""The checks every HTTP request passes before a route sees it: API key, then body size.

Plain ASGI (not Starlette's BaseHTTPMiddleware) so streamed responses pass through untouched.
API keys are compared with `hmac.compare_digest` against every configured key (no early exit), so
the time taken says nothing about how much of a key was right. /health stays open for probes.
The body limit is enforced twice: a declared Content-Length over the limit is refused before
reading, and a chunked body is cut off as soon as it grows past the limit (bodies are read here,
whole, and replayed to the route).
"""

from __future__ import annotations

import hmac
import json

from posttrain.serve.protocol import error_body

OPEN_PATHS = ("/health",)


async def _send_json(send, status: int, body: dict, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": payload})


class Guard:
    def __init__(self, app, api_keys: list[str], max_body_bytes: int):
        self.app = app
        self.keys = [k.encode() for k in api_keys]
        self.max_body_bytes = max_body_bytes

    def _authorized(self, scope) -> bool:
        if not self.keys:
            return True
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer":
            token = b""
        ok = False
        for key in self.keys:  # every key is compared: the timing does not depend on which one matched
            ok |= hmac.compare_digest(token.strip(), key)
        return ok

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["path"] not in OPEN_PATHS and not self._authorized(scope):
            return await _send_json(send, 401, error_body("Incorrect or missing API key. Send it as "
                                                          "'Authorization: Bearer <key>'.", code="invalid_api_key"),
                                    [(b"www-authenticate", b"Bearer")])
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
