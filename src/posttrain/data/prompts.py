"""Prompt rows for RL (`posttrain ppo` / `grpo`): a prompt to generate from, plus any extra columns.

Formats, named by the fields a row holds (after `columns:` renaming):
  prompt_completion  prompt: a string or a list of messages; system?, tools?
  openai / sharegpt  messages (or conversations): a message list; a trailing assistant message is
                     not part of the prompt (its text is kept as the `completion` column)
  alpaca             instruction; input?, system?, history?

Every other column (answer, solution, ground_truth, ...) is kept as it is and handed to the reward
functions by name, the way TRL passes dataset columns to `reward_funcs`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from posttrain.data.formats import (
    DatasetSpec, LoadReport, _Invalid, _alpaca, _check_order, _parse_messages, _tools, _turns, _with_system,
    load_records)
from posttrain.data.schema import Message
from posttrain.data.sources import type_name
from posttrain.errors import DataError

PROMPT_FORMATS = ("auto", "prompt_completion", "openai", "sharegpt", "alpaca")
# The columns a format consumes; everything else in the row is an extra column.
_CONSUMED = {"prompt", "messages", "conversations", "instruction", "input", "system", "tools", "history"}


@dataclass
class Prompt:
    """One prompt: the conversation so far (ends with a user or tool message) and its extra columns."""

    messages: list[Message]
    raw: Any  # the prompt as the row gave it (a string or a message list): what reward functions receive
    extra: dict[str, Any] = field(default_factory=dict)
    tools: list[dict[str, Any]] | None = None
    source: str = ""


def detect_prompt_format(keys: set[str]) -> str | None:
    if "prompt" in keys:
        return "prompt_completion"
    if "messages" in keys:
        return "openai"
    if "conversations" in keys:
        return "sharegpt"
    if "instruction" in keys:
        return "alpaca"
    return None


def to_prompt(row: dict, fmt: str, source: str, rownum: int) -> Prompt:
    try:
        if fmt == "auto":
            fmt = detect_prompt_format(set(row))
            if fmt is None:
                raise _Invalid(f"cannot find a prompt in keys {sorted(row)}; expected prompt, messages, "
                               "conversations or instruction (map yours with `columns:`)")
        extra = {k: v for k, v in row.items() if k not in _CONSUMED}
        if fmt == "prompt_completion":
            if "prompt" not in row:
                raise _Invalid(f"missing field 'prompt' (row has keys {sorted(row)})")
            messages, raw = _with_system(_turns(row["prompt"], "prompt", "user"), row), row["prompt"]
        elif fmt in ("openai", "sharegpt"):
            key = "messages" if "messages" in row else "conversations"
            if not isinstance(row.get(key), list):
                raise _Invalid(f"field {key!r} must be a list of messages, got {type_name(row.get(key))}")
            messages = _with_system(_parse_messages(row[key], "message"), row)
            if messages and messages[-1].role == "assistant":  # a full conversation: its answer is not prompt
                extra.setdefault("completion", messages.pop().content)
            raw = [m.to_dict() for m in messages]
        elif fmt == "alpaca":
            messages = _alpaca({**row, "output": ""}, "alpaca")[0][:-1]
            raw = [m.to_dict() for m in messages]
        else:
            raise _Invalid(f"unknown prompt format {fmt!r}; expected one of {PROMPT_FORMATS}")
        if not messages or messages[-1].role not in ("user", "tool"):
            raise _Invalid("the prompt must end with a user (or tool) message for the model to answer")
        _check_order(messages + [Message("assistant", "(the answer to generate)")])
        return Prompt(messages, raw, extra, _tools(row.get("tools")), f"{source}:{rownum}")
    except _Invalid as e:
        raise DataError(str(e), source, rownum) from None


def load_prompts(specs: list[DatasetSpec], on_bad_rows: str = "error", seed: int = 0,
                 max_samples: int | None = None) -> tuple[list[Prompt], LoadReport]:
    return load_records(specs, to_prompt, detect_prompt_format, on_bad_rows, seed, max_samples, PROMPT_FORMATS)
