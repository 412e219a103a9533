"""Detect and normalize every supported SFT / pre-training row format to `Conversation`.

Formats, named by the fields a row holds (after `columns:` renaming):
  prompt_completion  prompt + completion, each a string or a list of messages (TRL); system?, tools?
  alpaca             instruction (or `instruc`) + output; input?, system?, history? (LLaMA-Factory)
  role               user + assistant; role="system" + content give the system prompt
  openai             messages: [{role, content, tool_calls?, name?, tool_call_id?}]; system?, tools?
  sharegpt           conversations: [{from, value}] (LLaMA-Factory names); system?, tools?
  text               text: a plain document, for continued pre-training

Message lists accept either item shape ({role, content} or {from, value}) under either column, and
these role names, which mean one thing wherever they appear:
  human -> user, gpt -> assistant, observation -> tool,
  function_call -> an assistant message whose tool call is the JSON value ({name, arguments} or a
  list of those).
Tool calls come out in OpenAI shape with `arguments` as a dict (what HF chat templates expect);
tools given as bare function schemas ({name, description, parameters}) are wrapped as
{"type": "function", "function": schema}.

A message's content may also be a list of parts: OpenAI's [{"type": "text", "text": ...}] or
LLaMA-Factory v1's [{"type": "text" | "reasoning" | "tool_call", "value": ...}] (its per-message
`loss_weight` 0 keeps an assistant turn out of the loss). Text parts are joined by newlines; image,
audio and video parts are refused. An assistant's reasoning (`reasoning_content`, `thinking` or
`reasoning`, or v1 reasoning parts) is kept apart from its content and handed to templates that
render it.

Detection is per file, from its first row that converts; every later row of that file must then
be in the same format. Text is kept exactly as given (never stripped).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from typing import Any, Callable

from posttrain.data.schema import ROLES, Conversation, Message
from posttrain.data.sources import BadRow, read_rows, type_name
from posttrain.errors import ConfigError, DataError

FORMATS = ("auto", "prompt_completion", "alpaca", "role", "openai", "sharegpt", "text")

# Every canonical column name, for checking `columns:`; optional ones may be absent from a row.
REQUIRED_COLUMNS = {"prompt", "completion", "instruction", "output", "user", "assistant",
                    "messages", "conversations", "text"}
OPTIONAL_COLUMNS = {"system", "tools", "input", "history", "role", "content"}
# Preference and unpaired (KTO) rows, read by data/preference_formats.py with the same loader.
PREFERENCE_COLUMNS = {"chosen", "rejected"}
PREFERENCE_OPTIONAL_COLUMNS = {"margin", "label", "kto_tag", "chosen_messages", "rejected_messages"}
REQUIRED_COLUMNS |= PREFERENCE_COLUMNS
OPTIONAL_COLUMNS |= PREFERENCE_OPTIONAL_COLUMNS
COLUMNS = REQUIRED_COLUMNS | OPTIONAL_COLUMNS

_ALIASES = {"human": "user", "gpt": "assistant", "observation": "tool"}
_SHAREGPT_ROLES = ("human", "gpt", "system", "function_call", "observation")
_EXPECTED_KEYS = ("messages (openai), conversations (sharegpt), prompt + completion, "
                  "instruction + output (alpaca), user + assistant (role) or text")


class _Invalid(Exception):
    """A problem with one row, raised by the helpers below; to_conversation adds file and row."""


def detect_format(keys: set[str]) -> str | None:
    """The format a row with these keys is in, or None if it matches none."""
    if "messages" in keys:
        return "openai"
    if "conversations" in keys:
        return "sharegpt"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if ("instruction" in keys or "instruc" in keys) and "output" in keys:
        return "alpaca"
    if {"user", "assistant"} <= keys:
        return "role"
    if "text" in keys:
        return "text"
    return None


def to_conversation(row: dict, fmt: str, source: str, rownum: int) -> Conversation:
    """Normalize and validate one row; raises DataError naming source:rownum and the problem."""
    try:
        if fmt == "auto":
            fmt = detect_format(set(row)) or _undetectable(row)
        if fmt == "text":
            conv = Conversation(text=_text(row))
        else:
            builders = {"prompt_completion": _prompt_completion, "alpaca": _alpaca, "role": _role,
                        "openai": _messages_row, "sharegpt": _messages_row}
            if fmt not in builders:
                raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
            messages, tools = builders[fmt](row, fmt)
            _check_order(messages)
            conv = Conversation(messages=messages, tools=tools)
    except _Invalid as e:
        raise DataError(str(e), source, rownum) from None
    conv.source = f"{source}:{rownum}"
    return conv


def _undetectable(row: dict) -> str:
    hint = ""
    if {"chosen", "rejected"} <= set(row):
        hint = "; chosen/rejected is a preference dataset: use it with a preference stage, not SFT"
    raise _Invalid(f"cannot detect the format from keys {sorted(row)}; expected {_EXPECTED_KEYS}; "
                   f"map your columns with `columns:` or set `formatting:`{hint}")


# ---- the formats ----------------------------------------------------------------------------

def _require(row: dict, key: str, fmt: str) -> Any:
    if key not in row:
        raise _Invalid(f"missing field {key!r} required by the {fmt} format; row has keys {sorted(row)}")
    return row[key]


def _string(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"{what} must be a string, got {type_name(value)}")
    return value


def _optional_string(row: dict, key: str) -> str | None:
    """An optional string column: null or "" (an empty CSV cell) means absent."""
    value = row.get(key)
    if value is None or value == "":
        return None
    return _string(value, f"field {key!r}")


def _with_system(messages: list[Message], row: dict) -> list[Message]:
    system = _optional_string(row, "system")
    if system is None:
        return messages
    if messages and messages[0].role == "system":
        raise _Invalid("row has both a 'system' field and a system message; keep one")
    return [Message("system", system), *messages]


def _text(row: dict) -> str:
    text = _string(_require(row, "text", "text"), "field 'text'")
    if not text.strip():
        raise _Invalid("field 'text' is empty")
    return text


def _prompt_completion(row: dict, fmt: str) -> tuple[list[Message], Any]:
    prompt = _turns(_require(row, "prompt", fmt), "prompt", "user")
    completion = _turns(_require(row, "completion", fmt), "completion", "assistant")
    return _with_system(prompt + completion, row), _tools(row.get("tools"))


def _turns(value: Any, key: str, role: str) -> list[Message]:
    """A prompt/completion field: a string (one message of `role`) or a list of messages."""
    if isinstance(value, str):
        return [Message(role, value)]
    if isinstance(value, list):
        return _parse_messages(value, f"{key} message")
    raise _Invalid(f"field {key!r} must be a string or a list of messages, got {type_name(value)}")


def _alpaca(row: dict, fmt: str) -> tuple[list[Message], Any]:
    key = "instruction" if "instruction" in row or "instruc" not in row else "instruc"
    instruction = _string(_require(row, key, fmt), f"field {key!r}")
    output = _string(_require(row, "output", fmt), "field 'output'")
    extra = _optional_string(row, "input")
    # Like LLaMA-Factory: the input goes under the instruction, joined by a newline, when given.
    query = "\n".join(part for part in (instruction, extra) if part)
    messages = []
    history = row.get("history")
    if history not in (None, "", []):
        if not isinstance(history, list):
            raise _Invalid(f"field 'history' must be a list of [user, assistant] pairs, got "
                           f"{type_name(history)}")
        for i, pair in enumerate(history, 1):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2
                    and all(isinstance(t, str) for t in pair)):
                raise _Invalid(f"history item {i} must be a [user, assistant] pair of strings, "
                               f"got {json.dumps(pair, default=str)[:80]}")
            messages += [Message("user", pair[0]), Message("assistant", pair[1])]
    messages += [Message("user", query), Message("assistant", output)]
    return _with_system(messages, row), None


def _role(row: dict, fmt: str) -> tuple[list[Message], Any]:
    user = _string(_require(row, "user", fmt), "field 'user'")
    assistant = _string(_require(row, "assistant", fmt), "field 'assistant'")
    messages = [Message("user", user), Message("assistant", assistant)]
    role = row.get("role")
    if role is not None and role != "system":
        raise _Invalid(f"field 'role' is {role!r}; in a role record role/content hold the system "
                       "prompt, so role must be 'system'")
    content = _optional_string(row, "content")
    if content is not None:
        messages.insert(0, Message("system", content))
    return messages, None


def _messages_row(row: dict, fmt: str) -> tuple[list[Message], Any]:
    key = "messages" if fmt == "openai" else "conversations"
    value = _require(row, key, fmt)
    if not isinstance(value, list):
        raise _Invalid(f"field {key!r} must be a list of messages, got {type_name(value)}")
    return _with_system(_parse_messages(value, "message"), row), _tools(row.get("tools"))


# ---- messages, tool calls and tools -----------------------------------------------------------

def _parse_messages(items: list, label: str) -> list[Message]:
    return [_parse_message(item, f"{label} {i}") for i, item in enumerate(items, 1)]


def _parse_message(item: Any, what: str) -> Message:
    if not isinstance(item, dict):
        raise _Invalid(f"{what} must be an object with role and content, got {type_name(item)}")
    # Arrow-backed files give every message every key, absent ones as null: null means absent.
    if item.get("role") is not None:
        tag, text_key, expected = item["role"], "content", ROLES
    elif item.get("from") is not None:
        tag, text_key, expected = item["from"], "value", _SHAREGPT_ROLES
    else:
        raise _Invalid(f"{what} has no 'role' (or ShareGPT 'from') key; it has keys {sorted(item)}")
    if not isinstance(tag, str):
        raise _Invalid(f"{what} role must be a string, got {type_name(tag)}")
    role = _ALIASES.get(tag, tag)
    if role == "function_call":  # ShareGPT: the value is the call itself
        calls = _json_value(item.get(text_key), f"{what} (function_call) value")
        calls = calls if isinstance(calls, list) else [calls]
        return Message("assistant", "", tool_calls=[_tool_call(c, what, j)
                                                    for j, c in enumerate(calls, 1)])
    if role not in ROLES:
        raise _Invalid(f"{what} has unknown role {tag!r}; expected one of {', '.join(expected)}")

    calls = item.get("tool_calls")
    if calls not in (None, []):
        if role != "assistant":
            raise _Invalid(f"{what} ({role}) has tool_calls; only assistant messages may")
        if not isinstance(calls, list):
            raise _Invalid(f"{what} tool_calls must be a list, got {type_name(calls)}")
        calls = [_tool_call(c, what, j) for j, c in enumerate(calls, 1)]
    else:
        calls = None

    reasoning = _reasoning(item, role, what)
    value = item.get(text_key)
    if isinstance(value, list):  # content parts (OpenAI, LLaMA-Factory v1)
        value, part_reasoning, part_calls = _parts(value, f"{what} ({role})")
        if part_calls:
            if role != "assistant":
                raise _Invalid(f"{what} ({role}) has a tool_call part; only assistant messages may call tools")
            calls = (calls or []) + part_calls
        if part_reasoning is not None:
            if role != "assistant" or reasoning is not None:
                raise _Invalid(f"{what} ({role}) has a reasoning part" + (
                    " and a reasoning field; keep one" if reasoning is not None else "; only assistant messages may"))
            reasoning = part_reasoning
    if text_key not in item:
        if not calls:
            raise _Invalid(f"{what} ({role}) has no {text_key!r}")
        content = ""
    elif value is None and calls:
        content = ""  # OpenAI: an assistant message that only calls tools has content null
    else:
        content = _string(value, f"{what} ({role}) {text_key}")
    name, call_id = item.get("name"), item.get("tool_call_id")
    if role == "tool":
        name = None if name is None else _string(name, f"{what} (tool) name")
        call_id = None if call_id is None else _string(call_id, f"{what} (tool) tool_call_id")
    else:
        name = call_id = None
    return Message(role, content, tool_calls=calls, name=name, tool_call_id=call_id, reasoning=reasoning,
                   trained=_trained(item, role, what))


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_TEXT_PARTS = ("text", "reasoning", "tool_call")


def _reasoning(item: dict, role: str, what: str) -> str | None:
    """An assistant's reasoning field (the names chat templates and APIs use); empty means none."""
    given = [k for k in _REASONING_FIELDS if item.get(k) not in (None, "")]
    if not given:
        return None
    if role != "assistant":
        raise _Invalid(f"{what} ({role}) has {given[0]!r}; only assistant messages carry reasoning")
    if len(given) > 1:
        raise _Invalid(f"{what} has both {given[0]!r} and {given[1]!r}; keep one")
    return _string(item[given[0]], f"{what} (assistant) {given[0]}")


def _parts(parts: list, what: str) -> tuple[str, str | None, list[dict[str, Any]]]:
    """Content parts -> (text, reasoning, tool calls). Text is under `text` (OpenAI) or `value` (v1)."""
    texts, reasoning, calls = [], [], []
    for j, part in enumerate(parts, 1):
        if isinstance(part, str):
            texts.append(part)
            continue
        if not isinstance(part, dict):
            raise _Invalid(f"{what} content part {j} must be an object with a type, got {type_name(part)}")
        kind = part.get("type", "text")
        if kind not in _TEXT_PARTS:  # images, audio, video, files
            raise _Invalid(f"{what} content part {j} has type {kind!r}; posttrain trains on text only (text, "
                           "reasoning and tool_call parts), so remove that part or the row")
        key = "value" if "value" in part else "text"
        value = part.get(key)
        if kind == "tool_call":
            calls.append(_tool_call(_json_value(value, f"{what} content part {j} (tool_call) value"), what, j))
            continue
        text = _string(value, f"{what} content part {j} ({kind}) {key}")
        (reasoning if kind == "reasoning" else texts).append(text)
    return "\n".join(texts), ("\n".join(reasoning) if reasoning else None), calls


def _trained(item: dict, role: str, what: str) -> bool:
    """LLaMA-Factory v1's per-message loss_weight: 1 trains an assistant turn, 0 leaves it out. Other
    roles are never trained (their weight is not read)."""
    weight = item.get("loss_weight")
    if weight is None or role != "assistant":
        return True
    if isinstance(weight, bool) or weight not in (0, 1):
        raise _Invalid(f"{what} has loss_weight {weight!r}; posttrain trains an assistant turn fully or not at "
                       "all, so use 1 or 0")
    return weight == 1


def _json_value(value: Any, what: str) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise _Invalid(f"{what} is not valid JSON: {e.msg} at column {e.colno}") from None


def _tool_call(call: Any, what: str, j: int) -> dict[str, Any]:
    """One call, OpenAI-shaped ({type, function: {name, arguments}}) or bare ({name, arguments})."""
    where = f"{what} tool call {j}"
    if not isinstance(call, dict):
        raise _Invalid(f"{where} must be an object, got {type_name(call)}")
    fn = call.get("function", call)
    if not isinstance(fn, dict):
        raise _Invalid(f"{where} function must be an object, got {type_name(fn)}")
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise _Invalid(f"{where} has no function name")
    args = _json_value(fn.get("arguments"), f"{where} arguments")
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise _Invalid(f"{where} arguments must be an object (or a JSON string of one), got "
                       f"{type_name(args)}")
    out: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": args}}
    if isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out


def _tools(value: Any) -> list[dict[str, Any]] | None:
    """The tools column: a list of schemas, or a JSON string of one (LLaMA-Factory stores strings)."""
    if value is None or value == "" or value == []:
        return None
    tools = _json_value(value, "field 'tools'")
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise _Invalid(f"field 'tools' must be a list of tool schemas, got {type_name(tools)}")
    return [t if "function" in t or "name" not in t else {"type": "function", "function": t}
            for t in tools] or None


# ---- validation -----------------------------------------------------------------------------

def _check_order(messages: list[Message]) -> None:
    """System first (optional), then user/assistant alternating from user, tools after calls,
    no empty user/assistant turns, and an assistant message last: that is what SFT trains on."""
    if not messages:
        raise _Invalid("conversation has no messages")
    prev: Message | None = None
    for i, m in enumerate(messages, 1):
        after = f"follows a {prev.role} message" if prev else "comes first"
        if m.role == "system" and prev is not None:
            raise _Invalid(f"message {i} is a system message; a system message may only come first")
        if m.role == "user" and prev is not None and prev.role not in ("system", "assistant"):
            raise _Invalid(f"message {i} (user) {after}; user and assistant turns must alternate"
                           + (" (after tool results the assistant replies)" if prev.role == "tool" else ""))
        if m.role == "assistant" and (prev is None or prev.role not in ("user", "tool")):
            raise _Invalid(f"message {i} (assistant) {after}; user and assistant turns must "
                           "alternate, starting with user")
        if m.role == "tool" and not (prev and (prev.role == "tool" or prev.tool_calls)):
            raise _Invalid(f"message {i} (tool) {after}; a tool message must follow an assistant "
                           "message with tool_calls or another tool message")
        if m.role in ("user", "assistant") and not m.content.strip() and not m.tool_calls:
            raise _Invalid(f"message {i} ({m.role}) is empty")
        prev = m
    if not any(m.role == "assistant" for m in messages):
        raise _Invalid("conversation has no assistant message to train on")
    if messages[-1].role != "assistant":
        raise _Invalid(f"conversation ends with a {messages[-1].role} message; for SFT it must "
                       "end with an assistant message")


# ---- loading datasets -----------------------------------------------------------------------

@dataclass
class DatasetSpec:
    path: str
    # Multiplier on the rows taken: 0.5 takes a seeded random half, 2.0 every row twice,
    # 1.5 every row once plus a seeded random half again.
    weight: float = 1.0
    formatting: str = "auto"  # one of FORMATS
    # canonical name -> the file's column name, e.g. {"prompt": "question"}; renamed before detection
    columns: dict[str, str] | None = None


def dataset_specs(config, which: str = "dataset") -> list[DatasetSpec]:
    """The sources a config's `dataset` (or `eval_dataset`) key names, as the loaders take them."""
    return [DatasetSpec(path=e.path, weight=e.weight, formatting=e.formatting, columns=e.columns)
            for e in config.dataset_entries(which)]


@dataclass
class LoadReport:
    per_source: dict[str, int]  # spec path -> rows it contributes (after weight and max_samples)
    bad_rows: int
    bad_reasons: list[str]  # the first 5, each "file:row: problem"


def load_conversations(specs: list[DatasetSpec], on_bad_rows: str = "error", seed: int = 0,
                       max_samples: int | None = None) -> tuple[list[Conversation], LoadReport]:
    """Read, normalize, validate and weight every spec; concatenated in spec order, unshuffled.

    on_bad_rows="error" raises the first bad row's DataError; "skip" drops bad rows and counts
    them in the report. Either way a file with no usable row left is a DataError.
    """
    return load_records(specs, to_conversation, detect_format, on_bad_rows, seed, max_samples)


def load_records(specs: list[DatasetSpec], convert: Callable[[dict, str, str, int], Any],
                 detect: Callable[[set[str]], str | None], on_bad_rows: str = "error", seed: int = 0,
                 max_samples: int | None = None, formats: tuple[str, ...] = FORMATS) -> tuple[list, LoadReport]:
    """`load_conversations` for any record type: `convert(row, fmt, source, rownum)` builds one
    record (raising DataError for a bad row), `detect(keys)` names a row's format, and `formats`
    are the `formatting:` values allowed."""
    if on_bad_rows not in ("error", "skip"):
        raise ConfigError(f"on_bad_rows must be 'error' or 'skip', got {on_bad_rows!r}")
    if max_samples is not None and max_samples < 1:
        raise ConfigError(f"max_samples must be a positive number of rows, got {max_samples}")
    report = LoadReport(per_source={}, bad_rows=0, bad_reasons=[])
    picked: list[tuple[str, Conversation]] = []
    for index, spec in enumerate(specs):
        _check_spec(spec, formats)
        convs = _load_spec(spec, on_bad_rows, report, convert, detect)
        rng = random.Random(f"{seed}/{index}")  # per spec: adding a spec leaves the others' picks alone
        picked += [(spec.path, c) for c in _apply_weight(convs, spec.weight, rng)]
    if max_samples is not None:
        picked = picked[:max_samples]
    for spec in specs:
        report.per_source.setdefault(spec.path, 0)
    for path, _ in picked:
        report.per_source[path] += 1
    return [c for _, c in picked], report


def _check_spec(spec: DatasetSpec, formats: tuple[str, ...] = FORMATS) -> None:
    if spec.formatting not in formats:
        raise ConfigError(f"{spec.path}: formatting {spec.formatting!r} is not one of {', '.join(formats)}")
    if not (isinstance(spec.weight, (int, float)) and math.isfinite(spec.weight) and spec.weight >= 0):
        raise ConfigError(f"{spec.path}: weight must be a number >= 0, got {spec.weight!r}")
    for canon, col in (spec.columns or {}).items():
        if canon not in COLUMNS:
            raise ConfigError(f"{spec.path}: columns: unknown name {canon!r}; expected one of "
                              f"{', '.join(sorted(COLUMNS))}")
        if not isinstance(col, str):
            raise ConfigError(f"{spec.path}: columns: {canon} must name a column, got {col!r}")


def _load_spec(spec: DatasetSpec, on_bad_rows: str, report: LoadReport, convert=to_conversation,
               detect=detect_format) -> list:
    convs: list[Conversation] = []
    fmt_of: dict[str, str] = {}  # file -> format fixed by its first good row
    seen: dict[str, int] = {}  # file -> rows read
    kept: dict[str, int] = {}  # file -> rows kept
    first_problem: dict[str, str] = {}
    for item in read_rows(spec.path):
        seen[item.source] = seen.get(item.source, 0) + 1
        try:
            if isinstance(item, BadRow):
                raise item.error()
            data = _rename(item.data, spec.columns, item.source, item.row)
            fmt = fmt_of.get(item.source, spec.formatting)
            conv = convert(data, fmt, item.source, item.row)
        except DataError as e:
            if on_bad_rows == "error":
                raise
            report.bad_rows += 1
            if len(report.bad_reasons) < 5:
                report.bad_reasons.append(str(e))
            first_problem.setdefault(item.source, str(e))
            continue
        if item.source not in fmt_of:
            fmt_of[item.source] = detect(set(data)) if spec.formatting == "auto" else spec.formatting
        kept[item.source] = kept.get(item.source, 0) + 1
        convs.append(conv)
    for source, n in seen.items():
        if not kept.get(source):
            raise DataError(f"no usable rows: all {n} rows are bad; the first: "
                            f"{first_problem[source]}", source)
    return convs


def _rename(data: dict, columns: dict[str, str] | None, source: str, row: int) -> dict:
    """Rename the file's columns to canonical names; swaps like {a: b, b: a} work."""
    if not columns:
        return data
    mapped = set(columns.values())
    out = {k: v for k, v in data.items() if k not in mapped}
    for canon, col in columns.items():
        if col in data:
            out[canon] = data[col]
        elif canon not in OPTIONAL_COLUMNS:
            raise DataError(f"column {col!r} (mapped to {canon!r} by columns:) not found; row has "
                            f"keys {sorted(data)}", source, row)
    return out


def _apply_weight(convs: list[Conversation], weight: float, rng: random.Random) -> list[Conversation]:
    whole = int(weight)
    extra = round((weight - whole) * len(convs))
    picks = sorted(rng.sample(range(len(convs)), extra))  # file order, so runs read alike
    # Repeats share the same objects: rows are read-only from here on.
    return convs * whole + [convs[i] for i in picks]
