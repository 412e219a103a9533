"""Request bodies of the OpenAI API subset posttrain serves, and their errors' JSON shape.

Fields OpenAI defines that posttrain does not implement (tools, response formats, logit_bias,
echo, suffix, best_of > 1) are refused with a 400 naming the field, never silently ignored.
vLLM's sampling extras (top_k, repetition_penalty, stop_token_ids, ignore_eos) are accepted, so
clients written for vLLM work unchanged (the openai client sends them via `extra_body`).

Numbers are taken as JSON means them: NaN and Infinity (which Python's json reads) are refused,
and so are booleans where an integer is expected (bool is an int subclass to pydantic's lax mode).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, field_validator

from posttrain.inference.errors import RequestError


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """The body of every error answer (OpenAI's shape); published in /openapi.json."""

    error: ErrorDetail


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str
    max_tokens: StrictInt | None = Field(default=None)
    temperature: StrictFloat = 1.0  # OpenAI's default
    top_p: StrictFloat = 1.0
    n: StrictInt = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: StrictFloat = 0.0
    frequency_penalty: StrictFloat = 0.0
    seed: StrictInt | None = None
    logit_bias: dict[str, StrictFloat] | None = None
    # vLLM extras
    top_k: StrictInt = 0
    repetition_penalty: StrictFloat = 1.0
    stop_token_ids: list[StrictInt] | None = None
    ignore_eos: bool = False

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def refuse_unsupported(self) -> None:
        if self.logit_bias:
            raise RequestError("logit_bias is not supported by this server", param="logit_bias")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(f"message content parts of type {part.get('type')!r} are not supported; "
                                   "this server takes text only", param="messages")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: StrictInt | None = None
    logprobs: bool = False
    top_logprobs: StrictInt | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.tools or self.tool_choice not in (None, "none"):
            raise RequestError("tools / tool_choice are not supported by this server", param="tools")
        if self.response_format and self.response_format.get("type") != "text":
            raise RequestError("response_format other than text is not supported by this server",
                               param="response_format")
        if not self.messages:
            raise RequestError("messages must not be empty", param="messages")

    def wanted_logprobs(self) -> int | None:
        if not self.logprobs:
            if self.top_logprobs:
                raise RequestError("top_logprobs needs logprobs: true", param="top_logprobs")
            return None
        return self.top_logprobs or 0

    def chat_messages(self) -> list[dict[str, str]]:
        out = []
        for m in self.messages:
            d = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            if m.name is not None:
                d["name"] = m.name
            if m.tool_call_id is not None:
                d["tool_call_id"] = m.tool_call_id
            out.append(d)
        return out


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    logprobs: StrictInt | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: StrictInt | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, value):
        # One clear message instead of pydantic's four union branches ("prompt.str: Input should be a valid string").
        def ids(x) -> bool:
            return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

        if isinstance(value, str) or (isinstance(value, list) and (
                all(isinstance(p, str) for p in value) or ids(value) or all(ids(p) for p in value))):
            return value
        raise ValueError("prompt must be a string, a list of strings, a list of token ids (integers, not "
                         "booleans) or a list of such lists")

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.echo:
            raise RequestError("echo is not supported by this server", param="echo")
        if self.suffix:
            raise RequestError("suffix is not supported by this server", param="suffix")
        if self.best_of not in (None, 1):
            raise RequestError("best_of > 1 is not supported by this server; use n", param="best_of")
        if self.logprobs is not None and not 0 <= self.logprobs <= 5:
            raise RequestError("logprobs must be between 0 and 5", param="logprobs")


class LoadAdapterRequest(BaseModel):
    lora_name: str
    lora_path: str


class UnloadAdapterRequest(BaseModel):
    lora_name: str
