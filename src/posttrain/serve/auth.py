"""The API key check: a dependency of every router but /health's (probes stay open).

Keys come as `Authorization: Bearer <key>` (FastAPI's HTTPBearer reads the header; it is also
what /openapi.json declares). A key is compared with `hmac.compare_digest` against every configured
key (no early exit), so the time taken says nothing about how much of a key was right.
"""

from __future__ import annotations

import hmac

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer


class Unauthorized(Exception):
    """No API key, or a wrong one (HTTP 401)."""


bearer = HTTPBearer(auto_error=False, description="One of the server's --api-key values")


def key_accepted(request: Request, credentials: HTTPAuthorizationCredentials | None) -> bool:
    keys = request.app.state.server.settings.api_key
    if not keys:
        return True
    token = credentials.credentials.strip().encode() if credentials is not None else b""
    ok = False
    for key in keys:  # every key is compared: the timing does not depend on which one matched
        ok |= hmac.compare_digest(token, key.encode())
    return ok


async def require_api_key(request: Request,
                          credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
    if not key_accepted(request, credentials):
        raise Unauthorized()
