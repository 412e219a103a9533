"""Request bodies of the OpenAI API subset posttrain serves, and their errors' JSON shape.

Every limit that holds on any server is a constraint on a field here (ranges, non-empty lists,
unsupported features), so a bad value is a 400 naming the field before the route runs; the limits
that depend on the server's flags and model are checked in limits.py. Fields OpenAI defines that
posttrain does not implement (tools, response formats, logit_bias, echo, suffix, best_of > 1) are
refused with a 400 naming the field, never silently ignored.
vLLM's sampling extras (top_k, repetition_penalty, stop_token_ids, ignore_eos) are accepted, so
clients written for vLLM work unchanged (the openai client sends them via `extra_body`).

Numbers are taken as JSON means them: NaN and Infinity (which Python's json reads) are refused,
and so are booleans where an integer is expected (bool is an int subclass to pydantic's lax mode).
"""

from __future__ import annotations

from typing import Annotated, Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

TokenId = Annotated[StrictInt, Field(ge=0)]  # the upper bound (the vocabulary) is the engine's check


def _refused(why: str = "not supported by this server") -> PydanticCustomError:
    """A refusal pydantic reports at the field (`param`), with our words instead of its own."""
    return PydanticCustomError("unsupported", why)


def _unless(accepted: Callable[[Any], bool], why: str = "not supported by this server"):
    """A field validator refusing any value but the `accepted` ones: a feature this server does not implement."""
    def check(value):
        if not accepted(value):
            raise _refused(why)
        return value
    return check


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
    max_tokens: StrictInt | None = Field(default=None, ge=1)  # its upper bound is the server's (limits.py)
    temperature: StrictFloat = Field(1.0, ge=0, le=100)  # OpenAI's default; 0: greedy
    top_p: StrictFloat = Field(1.0, gt=0, le=1)
    n: StrictInt = Field(1, ge=1)  # at most --max-n (limits.py)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: StrictFloat = Field(0.0, ge=-2, le=2)
    frequency_penalty: StrictFloat = Field(0.0, ge=-2, le=2)
    seed: StrictInt | None = None
    logit_bias: dict[str, StrictFloat] | None = None
    # vLLM extras
    top_k: StrictInt = Field(0, ge=0)  # 0: off
    repetition_penalty: StrictFloat = Field(1.0, gt=0)  # 1: off
    stop_token_ids: list[TokenId] | None = None
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value):
        if value == "" or (isinstance(value, list) and not all(value)):
            raise PydanticCustomError("empty_stop", "stop strings must be non-empty")
        return value

    _no_logit_bias = field_validator("logit_bias")(_unless(lambda v: not v))

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def asked_max_tokens(self) -> int | None:
        return self.max_tokens


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_call_id: str | None = None

    @field_validator("content")
    @classmethod
    def _text_only(cls, value):
        for part in value if isinstance(value, list) else ():
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _refused(f"message content parts of type {part.get('type')!r} are not supported; "
                                   "this server takes text only")
        return value

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part["text"] for part in self.content)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value, info: ValidationInfo):
        if value and not info.data.get("logprobs"):
            raise PydanticCustomError("needs_logprobs", "top_logprobs needs logprobs: true")
        return value

    _no_tools = field_validator("tools")(_unless(lambda v: not v))
    _no_tool_choice = field_validator("tool_choice")(_unless(lambda v: v in (None, "none")))
    _text_format = field_validator("response_format")(_unless(lambda v: not v or v.get("type") == "text",
                                                               "only text responses are supported by this server"))

    @property
    def asked_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def wanted_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

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
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    logprobs: StrictInt | None = Field(default=None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None
    best_of: StrictInt | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, value):
        # One clear message instead of pydantic's four union branches ("prompt.str: Input should be a valid string").
        def ids(x) -> bool:
            return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in x)

        if value == []:
            raise PydanticCustomError("empty_prompt", "give at least one prompt")
        if isinstance(value, str) or (isinstance(value, list) and (
                all(isinstance(p, str) for p in value) or ids(value) or all(ids(p) for p in value))):
            return value
        raise PydanticCustomError("prompt_shape", "prompt must be a string, a list of strings, a list of token ids "
                                  "(integers >= 0, not booleans) or a list of such lists")

    _no_echo = field_validator("echo")(_unless(lambda v: not v))
    _no_suffix = field_validator("suffix")(_unless(lambda v: not v))
    _no_best_of = field_validator("best_of")(_unless(lambda v: v in (None, 1),
                                                     "best_of > 1 is not supported by this server; use n"))

    def prompts(self) -> list[str | list[int]]:
        """The prompts of the request: one string or token-id list each."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        return list(self.prompt)


class LoadAdapterRequest(BaseModel):
    lora_name: str
    lora_path: str


class UnloadAdapterRequest(BaseModel):
    lora_name: str
