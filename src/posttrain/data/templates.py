"""A chat template beyond rendering: checked against the tokenizer, carried into saved folders, and
its end-of-turn marker for generation.

- `check_template_encodes`: a template's markers must survive the tokenizer. ChatML on a vocabulary
  without `_` renders `<|im_start|>` fine as text, but tokenizes it to `<|im` <unk> `start|>`: the
  model would train on, and be served, a marker that is not the template's. Refused at setup.
- `carry_template`: the template a stage trained with goes into the tokenizer it saves (transformers
  writes it as chat_template.jinja), so chat, serve, score and the next stage use it untold.
- `end_of_turn_ids`: where an assistant turn ends. A base whose EOS is `</s>`, trained with ChatML,
  ends its answers with `<|im_end|>`; generation must stop there, not run on into a new turn.

The end-of-turn marker is the one the trained masks use (data/chat.py `end_of_turn_marker`).
"""

from __future__ import annotations

from posttrain.data.chat import builtin_templates, end_of_turn_marker, resolve_template
from posttrain.errors import ConfigError

# Plain lowercase words every chat vocabulary holds: what does not survive is the template's own text.
PROBE_USER, PROBE_ANSWER = "hi", "hello"  # for check_template_encodes


def _render(tokenizer, source: str, with_answer: bool) -> str:
    messages = [{"role": "user", "content": PROBE_USER}]
    if with_answer:
        messages.append({"role": "assistant", "content": PROBE_ANSWER})
    return tokenizer.apply_chat_template(messages, chat_template=source, tokenize=False,
                                         add_generation_prompt=not with_answer)


def _probes(tokenizer, source: str) -> list[str]:
    """The probe conversation rendered whole and as a prompt ready to generate; none when the template refuses
    it (one that demands a system turn, say): the data rows then report their own error, with their place."""
    try:
        return [_render(tokenizer, source, True), _render(tokenizer, source, False)]
    except Exception:
        return []


def _where(template: str | None) -> str:
    return f"template {template!r}" if template else "the tokenizer's chat_template"


def _fix() -> str:
    return (f"use a template whose markers the tokenizer knows (`template:` a built-in: "
            f"{', '.join(builtin_templates())}, or a .jinja file), or add the markers to the tokenizer as "
            "special tokens (and resize the model's embeddings)")


def check_template_encodes(tokenizer, source: str, template: str | None = None) -> None:
    """Raise ConfigError unless the tokenizer encodes what `source` renders: no unknown token, and the ids
    decode back to the text. `template` is the name the user gave (None: the tokenizer's own)."""
    unk = tokenizer.unk_token_id
    for text in _probes(tokenizer, source):
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=tokenizer.is_fast)
        ids = encoded["input_ids"]
        if unk is not None and unk in ids:
            spans = [encoded["offset_mapping"][i] for i, t in enumerate(ids) if t == unk] if tokenizer.is_fast else []
            lost = list(dict.fromkeys(text[a:b] for a, b in spans))  # each piece once, in order
            start, end = (spans[0][0], spans[0][1]) if spans else (0, len(text))
            raise ConfigError(f"{_where(template)} renders text this tokenizer cannot encode: "
                              f"{', '.join(map(repr, lost)) or 'part of it'} (first in "
                              f"{_context(text, start, end)!r}) becomes the unknown token {tokenizer.unk_token!r}; "
                              + _fix())
        decoded = tokenizer.decode(ids, skip_special_tokens=False)
        # Spaces are compared loosely: sentencepiece decoders add or drop them around special tokens.
        if decoded.replace(" ", "") != text.replace(" ", ""):
            at = _first_difference(text.replace(" ", ""), decoded.replace(" ", ""))
            raise ConfigError(f"{_where(template)} renders text this tokenizer does not give back: "
                              f"{_context(text.replace(' ', ''), at, at + 1)!r} decodes as "
                              f"{_context(decoded.replace(' ', ''), at, at + 1)!r}; " + _fix())


def _context(text: str, start: int, end: int, width: int = 12) -> str:
    return text[max(0, start - width):end + width]


def _first_difference(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def check_chat_template(tokenizer, template: str | None) -> str:
    """The template source `template` names (or the tokenizer's own), checked against the tokenizer."""
    source = resolve_template(template, tokenizer)
    check_template_encodes(tokenizer, source, template)
    return source


def end_of_turn_ids(tokenizer, source: str) -> list[int]:
    """The token that ends an assistant turn in `source`: the added (special) token the template's
    end-of-turn marker (data/chat.py, the same probe the trained masks use) starts with (`<|im_end|>`,
    `<|eot_id|>`, `<end_of_turn>`, `</s>` ...); none when the marker is plain text or a token this
    tokenizer splits into pieces."""
    marker = end_of_turn_marker(tokenizer, source)
    added = tokenizer.get_added_vocab()
    token = max((t for t in added if t and marker.startswith(t)), key=len, default=None)
    if token is None or tokenizer(token, add_special_tokens=False)["input_ids"] != [added[token]]:
        return []
    return [added[token]]


def chat_stop_ids(tokenizer, source: str | None) -> list[int]:
    """What ends a chat answer: the tokenizer's EOS and the template's end-of-turn token."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for t in end_of_turn_ids(tokenizer, source) if source else []:
        if t not in ids:
            ids.append(t)
    return ids


def carry_template(tokenizer, template: str | None) -> None:
    """Before `tokenizer.save_pretrained`: the template a stage was told to use becomes the tokenizer's own, so
    the saved folder renders as it was trained. Without `template:` the tokenizer's own was used: kept as is."""
    if template:
        tokenizer.chat_template = resolve_template(template, tokenizer)
