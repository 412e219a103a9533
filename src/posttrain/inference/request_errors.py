"""Errors raised for one request or one adapter (the server maps them to HTTP statuses)."""

from posttrain.errors import ConfigError, PosttrainError


class RequestError(PosttrainError):
    """A request's parameters are invalid (HTTP 400): the message names the field and the allowed values."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class RequestTooLarge(RequestError):
    """The prompt plus max_tokens does not fit the engine's limits (HTTP 400, OpenAI's context-length error)."""


class AdapterError(ConfigError):
    """An adapter cannot be used: bad name, path outside the allowed folders, unreadable or mismatched weights."""


class ProtectedAdapter(AdapterError):
    """The API may not unload this adapter: the operator gave it when starting the server (HTTP 403)."""


class UnknownModel(PosttrainError):
    """A request names a model (base or adapter) that is not served (HTTP 404)."""

    def __init__(self, name: str):
        super().__init__(f"The model `{name}` does not exist.")
        self.name = name
