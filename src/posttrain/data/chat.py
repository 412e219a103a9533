"""Render conversations with a chat template and mark which tokens are trained.

Works for ANY chat template, not only ones with `{% generation %}` tags: each assistant turn's
span is found by rendering the conversation up to that turn twice — once ending with the
generation prompt, once including the turn — and taking the difference. The text is then
tokenized piece by piece (prompt piece, assistant piece, ...), which is exactly how the model
sees it at inference time: the prompt is tokenized alone and the answer is generated after it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from posttrain.data.schema import Conversation
from posttrain.errors import ConfigError, DataError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
BUILTIN_TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "templates"


def builtin_templates() -> list[str]:
    return sorted(p.stem for p in BUILTIN_TEMPLATES_DIR.glob("*.jinja"))


def resolve_template(template: str | None, tokenizer) -> str:
    """The jinja source to render with: a built-in name, a .jinja file, or the tokenizer's own."""
    if template:
        builtin = BUILTIN_TEMPLATES_DIR / f"{template}.jinja"
        if builtin.is_file():
            return builtin.read_text()
        path = Path(template)
        if path.suffix in (".jinja", ".j2", ".txt") and path.is_file():
            return path.read_text()
        raise ConfigError(
            f"template: {template!r} is neither a built-in template ({', '.join(builtin_templates())}) "
            "nor an existing .jinja file")
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates: the default one
        own = own.get("default")
    if not own:
        raise ConfigError(
            "the tokenizer has no chat_template; set `template:` to a built-in "
            f"({', '.join(builtin_templates())}) or a path to a .jinja file")
    return own


def check_template_syntax(source: str, template: str | None) -> None:
    """A template that does not parse is the template's fault, not the first data row's: say so once."""
    import jinja2
    from transformers.utils.chat_template_utils import _compile_jinja_template

    try:
        _compile_jinja_template(source)
    except jinja2.TemplateSyntaxError as err:
        where = f"template {template!r}" if template else "the tokenizer's chat_template"
        raise ConfigError(f"{where} does not parse: {err.message} (line {err.lineno} of the template); fix the "
                          f"template, or set `template:` to a built-in ({', '.join(builtin_templates())})") from None


@dataclass
class TokenizedSample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where not trained; aligned with input_ids (not shifted)
    source: str = ""

    @property
    def num_trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


class ChatRenderer:
    """Turns `Conversation`s into token ids plus a per-token trained mask."""

    def __init__(self, tokenizer, template: str | None = None, train_on_prompt: bool = False,
                 mask_history: bool = False):
        self.tokenizer = tokenizer
        self.template = resolve_template(template, tokenizer)
        check_template_syntax(self.template, template)
        self.train_on_prompt = train_on_prompt
        self.mask_history = mask_history
        self._warned_unstable = False

    def render(self, conv: Conversation, upto: int | None = None, generation_prompt: bool = False) -> str:
        messages = [m.to_dict() for m in conv.messages[:upto]]
        return self.tokenizer.apply_chat_template(
            messages, tools=conv.tools, chat_template=self.template,
            tokenize=False, add_generation_prompt=generation_prompt)

    def pieces(self, conv: Conversation) -> list[tuple[str, bool]]:
        """The rendered text cut into (text, trained) pieces; their concatenation is the full render."""
        if conv.is_text:
            eos = self.tokenizer.eos_token or ""
            return [(conv.text + eos, True)]
        full = self.render(conv)
        turns = [i for i, m in enumerate(conv.messages) if m.role == "assistant"]
        if self.mask_history:
            turns = turns[-1:]
        spans = self._assistant_spans(conv, full, turns)
        if spans is None:  # a template whose earlier turns are not prefixes of the whole (e.g. drops old reasoning)
            if not self._warned_unstable:
                log.warning("chat template renders earlier turns differently from the whole conversation; "
                            "training only the last assistant turn of multi-turn samples")
                self._warned_unstable = True
            spans = self._assistant_spans(conv, full, turns[-1:])
            if spans is None:
                raise DataError("chat template does not render the last assistant turn as a suffix of the "
                                "conversation; cannot find which tokens to train", conv.source or None)
        out, pos = [], 0
        for start, end in spans:
            if start > pos:
                out.append((full[pos:start], False))
            out.append((full[start:end], True))
            pos = end
        if pos < len(full):
            out.append((full[pos:], False))
        if self.train_on_prompt:
            out = [(text, True) for text, _ in out]
        return out

    def _assistant_spans(self, conv: Conversation, full: str, turns: list[int]) -> list[tuple[int, int]] | None:
        spans = []
        for i in turns:
            upto_turn = self.render(conv, upto=i + 1)
            if not full.startswith(upto_turn):
                return None
            prompt = self.render(conv, upto=i, generation_prompt=True)
            if not upto_turn.startswith(prompt):  # generation prompt differs from the turn's header
                prompt = self.render(conv, upto=i)
                if not upto_turn.startswith(prompt):
                    return None
            # Train the end-of-turn marker but not whitespace after it: generation stops at the marker.
            end = len(upto_turn.rstrip())
            if end <= len(prompt):
                end = len(upto_turn)
            spans.append((len(prompt), end))
        return spans

    def tokenize(self, conv: Conversation) -> TokenizedSample:
        input_ids: list[int] = []
        labels: list[int] = []
        for text, trained in self.pieces(conv):
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            input_ids.extend(ids)
            labels.extend(ids if trained else [IGNORE_INDEX] * len(ids))
        return TokenizedSample(input_ids, labels, conv.source)

    def prompt_ids(self, conv: Conversation) -> list[int]:
        """Token ids of the conversation up to (not including) its last assistant turn, ready to generate."""
        last = max(i for i, m in enumerate(conv.messages) if m.role == "assistant")
        text = self.render(conv, upto=last, generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]


def preview(renderer: ChatRenderer, conv: Conversation, color: bool = False) -> str:
    """One rendered sample with trained spans marked, for `posttrain data preview`."""
    out = []
    for text, trained in renderer.pieces(conv):
        if not trained:
            out.append(text)
        elif color:
            out.append(f"\033[42;30m{text}\033[0m")
        else:
            out.append(f"[[{text}]]")
    return "".join(out)
