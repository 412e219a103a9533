"""Every error answer in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

Exceptions map to statuses here, in one table for the app; routes raise and never build error
bodies. A body FastAPI cannot validate is a 400 naming the field (never its 422), and the error
answers of each route are published in /openapi.json as the ErrorResponse model.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from posttrain.errors import ConfigError
from posttrain.inference.request_errors import ProtectedAdapter, RequestError, RequestTooLarge, UnknownModel
from posttrain.serve.auth import Unauthorized, bearer, key_accepted
from posttrain.serve.protocol import ErrorResponse, error_body
from posttrain.serve.worker import EngineFailed


class TooManyRequests(Exception):
    """The server is at --max-concurrent-requests (HTTP 429)."""


class AdapterUnavailable(Exception):
    """A registered adapter's files can no longer be read (changed on disk since): HTTP 500 for its requests."""


class RuntimeAdaptersDisabled(Exception):
    """Loading or unloading adapters through the API, on a server started without --allow-runtime-adapters (403)."""


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


ERROR_STATUSES = {400: "Invalid request (body, field or value); `param` names the field",
                  401: "Missing or wrong API key",
                  403: "Not allowed on this server", 404: "Unknown model", 413: "Request body too large",
                  429: "Too many concurrent requests", 500: "Server or adapter failure",
                  503: "The engine thread is not running"}


def documented(*statuses: int) -> dict:
    """The error answers of a route, for /openapi.json."""
    return {status: {"model": ErrorResponse, "description": ERROR_STATUSES[status]} for status in statuses}


async def _invalid(request: Request, err: RequestValidationError):
    first = err.errors()[0] if err.errors() else {}
    if first.get("type") == "json_invalid":
        # FastAPI parses JSON before it runs dependencies: the key is checked here first, as for any other body
        if not key_accepted(request, await bearer(request)):
            return await _unauthorized(request, Unauthorized())
        return error_response(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', 'cannot parse')}")
    where = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
    return error_response(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}", param=where)


async def _unauthorized(_: Request, __: Unauthorized):
    return error_response(401, "Incorrect or missing API key. Send it as 'Authorization: Bearer <key>'.",
                          code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


async def _too_long(_: Request, err: RequestTooLarge):
    return error_response(400, str(err), param=err.param, code="context_length_exceeded")


async def _bad(_: Request, err: RequestError):
    return error_response(400, str(err), param=err.param)


async def _unknown(_: Request, err: UnknownModel):
    return error_response(404, f"The model `{err.name}` does not exist.", param="model", code="model_not_found")


async def _config(_: Request, err: ConfigError):  # adapter names, paths and files (AdapterError)
    return error_response(400, str(err))


async def _protected(_: Request, err: ProtectedAdapter):
    return error_response(403, str(err), param="lora_name", code="forbidden")


async def _runtime_disabled(_: Request, __: RuntimeAdaptersDisabled):
    return error_response(403, "runtime adapter loading is disabled on this server; start it with "
                               "--allow-runtime-adapters (and --adapter-dir for the folders it may load from)",
                          code="forbidden")


async def _busy(_: Request, err: TooManyRequests):
    return error_response(429, str(err), type_="rate_limit_error", code="too_many_requests")


async def _adapter_broken(_: Request, err: AdapterUnavailable):
    return error_response(500, str(err), type_="server_error", param="model", code="adapter_unavailable")


async def _failed(_: Request, err: EngineFailed):
    return error_response(500, str(err), type_="server_error")


async def _http(_: Request, err: HTTPException):  # Starlette's own: unknown path (404), wrong method (405)
    return error_response(err.status_code, str(err.detail), headers=getattr(err, "headers", None))


async def _bug(_: Request, err: Exception):  # still logged with its traceback by the server; the client gets one line
    return error_response(500, f"the server failed on this request ({type(err).__name__}); see the server log",
                          type_="server_error")


HANDLERS = {RequestValidationError: _invalid, Unauthorized: _unauthorized, RequestTooLarge: _too_long,
            RequestError: _bad, UnknownModel: _unknown, ConfigError: _config, ProtectedAdapter: _protected,
            RuntimeAdaptersDisabled: _runtime_disabled, TooManyRequests: _busy, AdapterUnavailable: _adapter_broken,
            EngineFailed: _failed, HTTPException: _http, Exception: _bug}


def status_of(err: Exception) -> int:
    """The status an exception raised while preparing a request is answered with (for the metrics)."""
    return 404 if isinstance(err, UnknownModel) else 500 if isinstance(err, AdapterUnavailable) else 400
