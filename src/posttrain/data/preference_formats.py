"""Detect and normalize preference rows to `Preference`, and KTO rows to `Unpaired`.

Preference formats (reward models, the DPO family), named by the fields a row holds after
`columns:` renaming:
  preference  prompt + chosen + rejected; each a string or a list of messages (TRL's standard and
              conversational forms); system?, tools?, margin?
              Without `prompt` (TRL's implicit prompt), chosen and rejected are whole conversations
              that must share every message before their last one: that shared part is the prompt.
              LLaMA-Factory v1's chosen_messages + rejected_messages are read the same way.
  sharegpt    conversations (or messages) + chosen + rejected, where chosen / rejected are one
              message object ({from: gpt, value} or {role: assistant, content}) or a string
              (LLaMA-Factory's ranking form); system?, tools?, margin?
  alpaca      instruction + chosen + rejected (strings); input?, system?, history?, margin?

Unpaired formats (KTO): any SFT row format (prompt_completion, openai, sharegpt, alpaca, ...) plus a
boolean `label` (TRL) or `kto_tag` (LLaMA-Factory) column; the last assistant message is the
completion, everything before it the prompt. KTO also takes preference pairs (a row with chosen +
rejected and no label): each becomes a desirable and an undesirable row, as TRL's
`unpair_preference_dataset` does.

A pair whose chosen and rejected responses are identical, an empty response, or an implicit-prompt
pair whose conversations differ before their last message is refused with file:line: problem.
"""

from __future__ import annotations

import math
from typing import Any

from posttrain.data.formats import (
    DatasetSpec, LoadReport, _Invalid, _alpaca, _check_order, _parse_message, _parse_messages, _tools, _turns,
    _with_system, detect_format, load_records, to_conversation)
from posttrain.data.schema import Message, Preference, Unpaired
from posttrain.data.sources import type_name
from posttrain.errors import DataError

PREFERENCE_FORMATS = ("auto", "preference", "sharegpt", "alpaca")
UNPAIRED_FORMATS = ("auto", "prompt_completion", "alpaca", "role", "openai", "sharegpt", "preference")
_LABEL_KEYS = ("label", "kto_tag")


# ---- preference pairs -------------------------------------------------------------------------

_V1_PAIR = {"chosen_messages": "chosen", "rejected_messages": "rejected"}


def _v1_pair(row: dict) -> dict:
    """LLaMA-Factory v1 names whole chosen / rejected conversations chosen_messages / rejected_messages."""
    if not set(_V1_PAIR) <= set(row) or {"chosen", "rejected"} & set(row):
        return row
    return {_V1_PAIR.get(k, k): v for k, v in row.items()}


def detect_preference_format(keys: set[str]) -> str | None:
    keys = set(_v1_pair(dict.fromkeys(keys)))
    if not {"chosen", "rejected"} <= keys:
        return None
    if "conversations" in keys or "messages" in keys:
        return "sharegpt"
    if "instruction" in keys:
        return "alpaca"
    return "preference"


def to_preference(row: dict, fmt: str, source: str, rownum: int) -> Preference:
    """Normalize and validate one preference row; raises DataError naming source:rownum."""
    row = _v1_pair(row)
    try:
        if fmt == "auto":
            fmt = detect_preference_format(set(row)) or _undetectable_pair(row)
        for key in ("chosen", "rejected"):
            if key not in row:
                raise _Invalid(f"missing field {key!r}; a preference row needs chosen and rejected "
                               f"(row has keys {sorted(row)})")
        tools = _tools(row.get("tools"))
        if fmt == "preference" and row.get("prompt") is None:
            prompt, chosen, rejected = _implicit_prompt(row["chosen"], row["rejected"])
        else:
            if fmt == "preference":
                prompt = _turns(row["prompt"], "prompt", "user")
            elif fmt == "sharegpt":
                key = "conversations" if "conversations" in row else "messages"
                if not isinstance(row.get(key), list):
                    raise _Invalid(f"field {key!r} must be a list of messages, got {type_name(row.get(key))}")
                prompt = _parse_messages(row[key], "message")
            elif fmt == "alpaca":
                # The alpaca builder makes [system?, history..., user, assistant]: drop the placeholder answer.
                prompt = _alpaca({**row, "output": ""}, "alpaca")[0][:-1]
            else:
                raise _Invalid(f"unknown preference format {fmt!r}; expected one of {PREFERENCE_FORMATS}")
            chosen = _response(row["chosen"], "chosen")
            rejected = _response(row["rejected"], "rejected")
        if fmt != "alpaca":  # alpaca put the system prompt in already
            prompt = _with_system(prompt, row)
        pair = Preference(prompt, chosen, rejected, _margin(row.get("margin")), tools)
        _check_pair(pair)
    except _Invalid as e:
        raise DataError(str(e), source, rownum) from None
    pair.source = f"{source}:{rownum}"
    return pair


def _undetectable_pair(row: dict) -> str:
    raise _Invalid(f"cannot detect a preference format from keys {sorted(row)}; expected chosen + rejected, "
                   "with prompt, conversations (sharegpt) or instruction (alpaca), or chosen/rejected as whole "
                   "conversations (implicit prompt); map your columns with `columns:`")


def _response(value: Any, key: str) -> Message:
    """chosen / rejected: a string, one message object, or a list holding one assistant message."""
    if isinstance(value, str):
        return Message("assistant", value)
    if isinstance(value, dict):
        message = _parse_message(value, key)
    elif isinstance(value, list):
        if len(value) != 1:
            raise _Invalid(f"field {key!r} has {len(value)} messages; with a separate prompt it must be the one "
                           "assistant response (leave out `prompt` to give whole conversations instead)")
        message = _parse_message(value[0], f"{key} message")
    else:
        raise _Invalid(f"field {key!r} must be a string, a message or a list of messages, got {type_name(value)}")
    if message.role != "assistant":
        raise _Invalid(f"field {key!r} is a {message.role} message; the response must be an assistant message")
    return message


def _implicit_prompt(chosen: Any, rejected: Any) -> tuple[list[Message], Message, Message]:
    """TRL's implicit prompt: two whole conversations that differ only in their last message."""
    for key, value in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, list):
            raise _Invalid(f"no 'prompt' field, so {key!r} must be a whole conversation (a list of messages), got "
                           f"{type_name(value)}; add a prompt column or map one with `columns:`")
        if len(value) < 2:
            raise _Invalid(f"no 'prompt' field, so {key!r} must be a whole conversation, but it has "
                           f"{len(value)} message(s): the prompt is the messages both share before the last one")
    c = _parse_messages(chosen, "chosen message")
    r = _parse_messages(rejected, "rejected message")
    if len(c) != len(r) or c[:-1] != r[:-1]:
        i = next((i for i, (a, b) in enumerate(zip(c[:-1], r[:-1])) if a != b), min(len(c), len(r)) - 1)
        raise _Invalid(f"prompt mismatch: chosen and rejected must share every message before their last one, but "
                       f"they differ at message {i + 1} (chosen has {len(c)} messages, rejected {len(r)})")
    for key, last in (("chosen", c[-1]), ("rejected", r[-1])):
        if last.role != "assistant":
            raise _Invalid(f"the last {key} message is a {last.role} message; it must be the assistant response")
    return c[:-1], c[-1], r[-1]


def _margin(value: Any) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _Invalid(f"field 'margin' must be a finite number, got {value!r}")
    return float(value)


def _empty(m: Message) -> bool:
    return not m.content.strip() and not m.tool_calls


def _check_pair(pair: Preference) -> None:
    for key, m in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        if _empty(m):
            raise _Invalid(f"the {key} response is empty")
    if ((pair.chosen.content, pair.chosen.tool_calls, pair.chosen.reasoning)
            == (pair.rejected.content, pair.rejected.tool_calls, pair.rejected.reasoning)):
        raise _Invalid("chosen and rejected are identical; a pair must say which of two different responses is "
                       "better")
    if not pair.prompt or pair.prompt[-1].role not in ("user", "tool"):
        last = pair.prompt[-1].role if pair.prompt else "nothing"
        raise _Invalid(f"the prompt ends with {last}; it must end with a user (or tool) message for the "
                       "response to answer")
    _check_order(pair.prompt + [pair.chosen])  # roles alternate, system first, no empty user turn


def load_preferences(specs: list[DatasetSpec], on_bad_rows: str = "error", seed: int = 0,
                     max_samples: int | None = None) -> tuple[list[Preference], LoadReport]:
    """Read, normalize, validate and weight preference data, like `load_conversations`."""
    return load_records(specs, to_preference, detect_preference_format, on_bad_rows, seed, max_samples,
                        formats=PREFERENCE_FORMATS)


# ---- unpaired (KTO) rows ------------------------------------------------------------------------

def detect_unpaired_format(keys: set[str]) -> str | None:
    return detect_format(keys - set(_LABEL_KEYS)) if keys & set(_LABEL_KEYS) else None


def to_unpaired(row: dict, fmt: str, source: str, rownum: int) -> Unpaired:
    """An SFT row plus a boolean label: the last assistant message is the judged completion."""
    keys = [k for k in _LABEL_KEYS if row.get(k) is not None]
    if not keys:
        raise DataError(f"missing field 'label' (or 'kto_tag'): each KTO row needs a true/false label for its "
                        f"completion, or chosen + rejected for a pair (row has keys {sorted(row)})", source, rownum)
    if len(keys) == 2:
        raise DataError("row has both 'label' and 'kto_tag'; keep one", source, rownum)
    label = row[keys[0]]
    if not isinstance(label, bool):
        raise DataError(f"field {keys[0]!r} must be true or false, got {label!r}", source, rownum)
    rest = {k: v for k, v in row.items() if k not in _LABEL_KEYS}
    if fmt == "auto":
        fmt = detect_format(set(rest)) or "auto"
    if fmt == "text":
        raise DataError("a text row has no prompt and completion to judge", source, rownum)
    conv = to_conversation(rest, fmt, source, rownum)
    *prompt, completion = conv.messages
    if not prompt or prompt[-1].role not in ("user", "tool"):
        raise DataError("the completion has no prompt before it; a KTO row needs a prompt and a completion",
                        source, rownum)
    return Unpaired(prompt, completion, label, conv.tools, conv.source)


def _is_pair(keys: set[str]) -> bool:
    return {"chosen", "rejected"} <= set(_v1_pair(dict.fromkeys(keys))) and not keys & set(_LABEL_KEYS)


def detect_kto_format(keys: set[str]) -> str | None:
    return detect_preference_format(keys) if _is_pair(keys) else detect_unpaired_format(keys)


def to_kto_record(row: dict, fmt: str, source: str, rownum: int) -> Unpaired | Preference:
    """A labelled row as `Unpaired`; a chosen/rejected row (no label) as the `Preference` it is."""
    if _is_pair(set(row)):
        return to_preference(row, fmt if fmt in PREFERENCE_FORMATS else "auto", source, rownum)
    return to_unpaired(row, "auto" if fmt == "preference" else fmt, source, rownum)


def unpair_preferences(records: list[Unpaired | Preference]) -> list[Unpaired]:
    """TRL's `unpair_preference_dataset`: every pair's chosen response becomes a desirable row and
    its rejected one an undesirable row. Labelled rows stay first and in order, then every pair's
    chosen row, then every pair's rejected row: in that order a row's neighbour (whose completion
    is its mismatched twin for the KL estimate, data/pairs.py) answers another prompt, not its own."""
    pairs = [r for r in records if isinstance(r, Preference)]
    rows = [r for r in records if not isinstance(r, Preference)]
    for label in (True, False):
        rows += [Unpaired(p.prompt, p.chosen if label else p.rejected, label, p.tools, p.source) for p in pairs]
    return rows


def load_kto_records(specs: list[DatasetSpec], on_bad_rows: str = "error", seed: int = 0,
                     max_samples: int | None = None) -> tuple[list[Unpaired | Preference], LoadReport]:
    """KTO data as read: labelled rows and preference pairs (max_samples counts a pair as one row)."""
    return load_records(specs, to_kto_record, detect_kto_format, on_bad_rows, seed, max_samples,
                        formats=UNPAIRED_FORMATS)


def load_unpaired(specs: list[DatasetSpec], on_bad_rows: str = "error", seed: int = 0,
                  max_samples: int | None = None) -> tuple[list[Unpaired], LoadReport]:
    """KTO rows, preference pairs among them unpaired."""
    records, report = load_kto_records(specs, on_bad_rows, seed, max_samples)
    return unpair_preferences(records), report
