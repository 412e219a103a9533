"""Every key of a command as commented YAML: `posttrain config COMMAND [config.yaml] [key=value ...]`.

One line per key, `key: value  # what it does`, grouped under the class that defines the key (its
docstring heads the group), the key's aliases from the alias table named after it. Without a config
the values are the defaults; with one, its values (and its leading comments head the output), the
comment naming the default wherever a value differs from it. The examples that list every key are
this output, held to it by tests/test_examples.py.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from posttrain.config import ALIASES, COMMANDS, FLAG_COMMANDS, load_config

ALIGN = 40  # comments start in this column where the `key: value` before them fits


def reference_yaml(command: str, path: str | None = None, overrides: list[str] | None = None) -> str:
    """The listing for `command`; with a config file or overrides, their values (the config must load)."""
    config = load_config(command, path, overrides) if path or overrides else None
    header = _leading_comments(path) if path else []
    return render(command, config, header or default_header(command))


def default_header(command: str) -> list[str]:
    how = "key=value or --flag" if command in FLAG_COMMANDS else "key=value"
    return [f"# posttrain {command}: every key with its default and what it does (`posttrain config {command}`).",
            f"#   posttrain {command} this.yaml [key=value ...]   (any key can also be given on the command line as "
            f"{how})"]


def render(command: str, config: BaseModel | None, header: list[str]) -> str:
    cls = COMMANDS[command]
    chosen = config.model_dump(mode="json") if config is not None else {}
    given = config.model_fields_set if config is not None else set()
    aliases = ALIASES.get(command, {})
    lines = list(header)
    for title, keys in sections(cls):
        rows = []
        for key in keys:
            field = cls.model_fields[key]
            default = None if field.is_required() else field.get_default(call_default_factory=True)
            value = chosen[key] if key in given else default
            text = description(cls, key)
            also = sorted(alias for alias, target in aliases.items() if target == key)
            if also:
                text += f" (alias {', '.join(also)})"
            if field.is_required():
                text = "required: " + text
            elif value != default:
                text += f" (default: {yaml_value(default)})"
            rows.append((f"{key}: {yaml_value(value)}", text))
        width = max((len(left) for left, _ in rows if len(left) < ALIGN), default=0)
        lines += ["", f"# {title}"] + [f"{left:<{width}}  # {text}" for left, text in rows]
    return "\n".join(lines) + "\n"


def sections(cls: type[BaseModel]) -> list[tuple[str, list[str]]]:
    """(title, keys) for each class in `cls`'s MRO that first defines some of its keys, most derived first;
    a key a subclass redefines (its default) stays with the class that introduced it."""
    owner = {key: [c for c in cls.__mro__ if key in _own_keys(c)][-1] for key in cls.model_fields}
    out = []
    for c in cls.__mro__:
        keys = [key for key in _own_keys(c) if owner.get(key) is c]
        if keys:
            doc = inspect.cleandoc(c.__dict__.get("__doc__") or c.__name__)
            out.append((" ".join(doc.split("\n\n")[0].split()), keys))
    return out


def description(cls: type[BaseModel], key: str) -> str:
    """The key's description, from the nearest class that gives one (a redefined default may not repeat it)."""
    for c in cls.__mro__:
        field = getattr(c, "model_fields", {}).get(key)
        if field is not None and field.description:
            return field.description
    raise KeyError(f"{cls.__name__}.{key} has no description")


def yaml_value(value: Any) -> str:
    """One value as YAML on one line: `0.0001`, `null`, `[a, b]`, `{name: path}`."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 20, sort_keys=False).strip()
    return text.removesuffix("...").strip()


def _own_keys(c: type) -> list[str]:
    return list(inspect.get_annotations(c)) if isinstance(c, type) and issubclass(c, BaseModel) else []


def _leading_comments(path: str) -> list[str]:
    lines = []
    for line in Path(path).read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return lines
