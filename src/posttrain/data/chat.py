"""Render conversations with a chat template and mark which tokens are trained.

Works for ANY chat template, not only ones with `{% generation %}` tags. The whole conversation is
rendered once and tokenized once (with character offsets), so the ids are exactly what
`tokenizer.apply_chat_template(messages, tokenize=True)` gives: one BOS, no prefix space that a
SentencePiece tokenizer would add again to a piece tokenized on its own.

Each assistant turn is then located in that text, as the template rendered it (templates may render
earlier turns differently from the last one, drop a system prompt, or insert scaffolding):
  - its content: render again with that one content replaced by a sentinel; the part that differs
    is where the content sits (so `| trim`, dropped reasoning and the like need no special case);
  - where its answer begins: the end of the generation prompt for the conversation before it, i.e.
    what the model is given at inference; the text from there to the content (tool-call syntax,
    a leading space) is trained, except a reasoning block the template inserts for a turn that has
    no reasoning (Qwen3's empty `<think>\\n\\n</think>\\n\\n`): that is the template's, not the answer;
  - where it ends: the template's end-of-turn marker after the content (`<|im_end|>`, `<|eot_id|>`,
    `<end_of_turn>`, `</s>`, `<|end|>`), found once by rendering a probe conversation; the newline
    after it is scaffolding, like the header.
Every token overlapping a trained character span is trained (as transformers does for
`return_assistant_tokens_mask`). A template where a turn cannot be located is refused with the row
and the reason, never trained on a guess. A template with `{% generation %}` tags has its author's
mask (transformers' `return_assistant_tokens_mask`) checked against ours, with a warning where they
differ.
"""

from __future__ import annotations

import logging
import re
from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from pathlib import Path

from posttrain.data.schema import Conversation, Message
from posttrain.errors import ConfigError, DataError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
BUILTIN_TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "templates"
# Private-use characters: no data or template text contains them, and `trim` leaves them alone.
_SENTINEL = "\ue000{}\ue001"
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")
_INLINE_REASONING_END = "</think>"  # reasoning kept in the content itself, as R1-style data does


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


@dataclass
class Turn:
    """One assistant turn as it appears in a rendered text."""

    message: int  # its index in the conversation's messages
    begin: int  # where the model's answer begins: the end of the generation prompt before it
    start: int  # the first trained character (after template scaffolding such as an empty reasoning block)
    end: int  # just after its end-of-turn marker


# ---- string helpers -------------------------------------------------------------------------------

def _common_prefix(a: str, b: str) -> int:
    """Length of the longest common prefix (binary search over slices: C speed, not a Python loop)."""
    lo, hi = 0, min(len(a), len(b))
    if a[:hi] == b[:hi]:
        return hi
    while hi - lo > 1:  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def _common_suffix(a: str, b: str, limit: int) -> int:
    lo, hi = 0, min(len(a), len(b), limit)
    if hi == 0 or a[len(a) - hi:] == b[len(b) - hi:]:
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[len(a) - mid:] == b[len(b) - mid:]:
            lo = mid
        else:
            hi = mid
    return lo


def _diff(full: str, variant: str) -> tuple[int, int, str] | None:
    """The region of `full` that differs from `variant` (a rendering with one field replaced by a
    sentinel), and the variant's side of it; None when the two are the same text."""
    if full == variant:
        return None
    p = _common_prefix(full, variant)
    s = _common_suffix(full, variant, min(len(full), len(variant)) - p)
    return p, len(full) - s, variant[p:len(variant) - s]


def end_of_turn_marker(tokenizer, source: str) -> str:
    """The text template `source` writes after every assistant answer, whatever follows it: what a
    one-turn conversation ends with when it is last and when a user message follows, in common
    (e.g. `<|im_end|>`), without a special token cut in half or trailing whitespace; "" if none."""
    answer, user = _SENTINEL.format(1), _SENTINEL.format(2)  # digits: the same under | upper or | trim
    base = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]

    def render(messages):
        return tokenizer.apply_chat_template(messages, chat_template=source, tokenize=False)

    for opening in ([], [{"role": "system", "content": _SENTINEL.format(3)}]):  # some templates want a system
        try:
            last = render(opening + base)
            followed = render(opening + base + [{"role": "user", "content": user}])
            break
        except Exception as err:  # the template's own raise_exception(...) or a jinja error
            problem = err
    else:
        log.warning("could not render a probe conversation to find the template's end-of-turn marker (%s); "
                    "assistant turns are trained up to the end of their content", problem)
        return ""
    if answer not in last or answer not in followed:
        return ""
    after_last = last[last.index(answer) + len(answer):]
    after_followed = followed[followed.index(answer) + len(answer):]
    n = _common_prefix(after_last, after_followed)
    for token in tokenizer.get_added_vocab():  # never end inside a special token
        at = after_last.find(token)
        while 0 <= at < n:
            if at + len(token) > n:
                n = at
            at = after_last.find(token, at + 1)
    return after_last[:n].rstrip()


class ChatRenderer:
    """Turns `Conversation`s into token ids plus a per-token trained mask."""

    def __init__(self, tokenizer, template: str | None = None, train_on_prompt: bool = False,
                 mask_history: bool = False, mask_reasoning: bool = False):
        self.tokenizer = tokenizer
        self.template = resolve_template(template, tokenizer)
        check_template_syntax(self.template, template)
        if not getattr(tokenizer, "is_fast", False):
            raise ConfigError("posttrain needs a fast tokenizer (a tokenizer.json) to tell which tokens belong to "
                              "which turn; this one is a slow (Python) tokenizer")
        self.train_on_prompt = train_on_prompt
        self.mask_history = mask_history
        self.mask_reasoning = mask_reasoning
        self._eot: str | None = None  # the template's end-of-turn marker, found on first use
        # Checked until the first disagreement is reported (one warning is enough to act on).
        self._check_generation_tags = bool(re.search(r"\{%-?\s*generation\s*-?%\}", self.template))

    # ---- rendering --------------------------------------------------------------------------------

    def render(self, conv: Conversation, upto: int | None = None, generation_prompt: bool = False) -> str:
        return self._render([m.to_dict() for m in conv.messages[:upto]], conv.tools, generation_prompt, conv.source)

    def _render(self, messages: list[dict], tools, generation_prompt: bool = False, source: str = "") -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages, tools=tools, chat_template=self.template, tokenize=False,
                add_generation_prompt=generation_prompt)
        except Exception as err:  # the template's own raise_exception(...) or a jinja error: name the row
            raise DataError(f"chat template failed to render this row: {err}", source or None) from None

    def encode(self, text: str) -> list[int]:
        """Token ids of rendered text, as apply_chat_template tokenizes it (no BOS/EOS added again)."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return enc["input_ids"], enc["offset_mapping"]

    # ---- finding the turns ------------------------------------------------------------------------

    def turns(self, conv: Conversation, last_only: bool | None = None) -> tuple[str, list[Turn]]:
        """The whole rendering and its trained assistant turns: all of them, or only the last one with
        mask_history (or `last_only`)."""
        full = self.render(conv)
        dicts = [m.to_dict() for m in conv.messages]
        wanted = [i for i, m in enumerate(conv.messages) if m.role == "assistant"]
        if self.mask_history if last_only is None else last_only:
            wanted = wanted[-1:]
        out = []
        for i in wanted:
            turn = self._locate(conv, dicts, full, i)
            if turn is None:
                if i == wanted[-1]:
                    raise DataError(f"the chat template does not render the last assistant message (message {i + 1}): "
                                    "there is nothing of it to train", conv.source or None)
                continue  # a template that leaves out earlier turns: they are not in the text the model sees
            if conv.messages[i].trained:
                out.append(turn)
        return full, out

    def _locate(self, conv: Conversation, dicts: list[dict], full: str, i: int) -> Turn | None:
        message = conv.messages[i]
        content = self._field_region(conv, dicts, full, i, "content")
        if content is None and not message.tool_calls:
            return None
        begin = self._answer_begin(conv, dicts, full, i, content)
        content_start, content_end = content if content else (begin, begin)
        if begin > content_start:
            raise DataError(f"the chat template renders assistant message {i + 1} before the generation prompt "
                            "for it ends; cannot tell which tokens are the answer", conv.source or None)
        start = begin
        holds_reasoning = bool(message.reasoning) or _INLINE_REASONING_END in message.content
        if (content_start > begin and full[begin:content_start].strip()
                and (not holds_reasoning or self.mask_reasoning) and self._renders_reasoning):
            # Text between the header and the content: train it, unless it is a reasoning block the
            # template writes for a turn that has none (or whose reasoning is kept out of the loss).
            reasoning = self._field_region(conv, dicts, full, i, "reasoning_content")
            if reasoning is not None and begin <= reasoning[0] <= content_start:
                start = content_start
        if self.mask_reasoning and _INLINE_REASONING_END in full[start:content_end]:
            # Reasoning written inline in the content (<think>...</think>): the answer starts after it.
            cut = full.rindex(_INLINE_REASONING_END, start, content_end) + len(_INLINE_REASONING_END)
            start = content_end - len(full[cut:content_end].lstrip())
        return Turn(i, begin, start, self._turn_end(conv, dicts, full, i, content_end))

    @property
    def _renders_reasoning(self) -> bool:
        return any(key in self.template for key in _REASONING_KEYS)

    def _field_region(self, conv: Conversation, dicts: list[dict], full: str, i: int, key: str,
                      generation_prompt: bool = False) -> tuple[int, int] | None:
        """Where message i's `key` (content or reasoning) sits in `full`; None if the template leaves it out."""
        sentinel = _SENTINEL.format(i)
        variant = [dict(d) for d in dicts]
        variant[i][key] = sentinel
        if key != "content":  # one reasoning field, whichever name the template reads
            for other in _REASONING_KEYS:
                variant[i].pop(other, None)
            variant[i]["reasoning_content"] = sentinel
        diff = _diff(full, self._render(variant, conv.tools, generation_prompt, conv.source))
        if diff is None:
            return None
        start, end, theirs = diff
        if theirs.count(sentinel) > 1:
            raise DataError(f"the chat template renders the {key.replace('_', ' ')} of message {i + 1} more than once; "
                            "cannot tell which copy is trained", conv.source or None)
        return start, end

    def _answer_begin(self, conv: Conversation, dicts: list[dict], full: str, i: int,
                      content: tuple[int, int] | None) -> int:
        """Where turn i's answer begins in `full`: the end of the generation prompt before it."""
        prompt = self._render(dicts[:i], conv.tools, True, conv.source)
        if full.startswith(prompt):
            return len(prompt)
        # The template renders the conversation before this turn differently on its own (Mistral puts
        # the system prompt before the LAST user message only): line up the end of the message before
        # the turn in both texts, then take what the generation prompt adds after it.
        previous = self._field_region(conv, dicts, full, i - 1, "content") if i else None
        alone = self._field_region(conv, dicts[:i], prompt, i - 1, "content", generation_prompt=True) if i else None
        if previous is None or alone is None:
            raise DataError(f"cannot find where assistant message {i + 1} begins: the chat template renders the "
                            "conversation before it differently from the generation prompt", conv.source or None)
        tail = prompt[alone[1]:]
        limit = content[0] if content else len(full)
        return previous[1] + _common_prefix(full[previous[1]:limit], tail)

    def _turn_end(self, conv: Conversation, dicts: list[dict], full: str, i: int, after: int) -> int:
        """Just after the end-of-turn marker that follows the turn's content (and its tool calls)."""
        eot = self.end_of_turn()
        if not eot:
            return after
        at = full.find(eot, after)
        if 0 <= at and i + 1 < len(dicts):  # the marker found must be this turn's, not a later message's
            following = self._field_region(conv, dicts, full, i + 1, "content")
            if following is not None and following[0] < at + len(eot):
                at = -1
        if at < 0:
            raise DataError(f"cannot find the end-of-turn marker {eot!r} after assistant message {i + 1}: the chat "
                            "template ends this turn differently from a plain answer", conv.source or None)
        return at + len(eot)

    def end_of_turn(self) -> str:
        """The text the template writes after every assistant answer, whatever follows it: what a
        one-turn conversation ends with when it is last and when a user message follows, in common
        (e.g. `<|im_end|>`), without a special token cut in half or trailing whitespace."""
        if self._eot is None:
            self._eot = end_of_turn_marker(self.tokenizer, self.template)
        return self._eot

    # ---- tokens and masks -------------------------------------------------------------------------

    def tokenize(self, conv: Conversation) -> TokenizedSample:
        """The whole conversation's ids (= apply_chat_template's) and labels on its assistant turns."""
        if conv.is_text:
            ids = self.encode(conv.text + (self.tokenizer.eos_token or ""))
            return TokenizedSample(ids, list(ids), conv.source)
        _, ids, _, labels = self._tokenized(conv)
        if self._check_generation_tags and not (self.train_on_prompt or self.mask_history or self.mask_reasoning):
            self._compare_with_generation_tags(conv, ids, labels)
        return TokenizedSample(ids, labels, conv.source)

    def _compare_with_generation_tags(self, conv: Conversation, ids: list[int], labels: list[int]) -> None:
        """Warn (once) where the template author's {% generation %} mask and ours disagree; ours is used."""
        if not all(m.trained for m in conv.messages):
            return
        theirs = self.tokenizer.apply_chat_template(
            [m.to_dict() for m in conv.messages], tools=conv.tools, chat_template=self.template, tokenize=True,
            return_dict=True, return_assistant_tokens_mask=True)
        ours = [int(x != IGNORE_INDEX) for x in labels]
        if list(theirs["input_ids"]) == ids and list(theirs["assistant_masks"]) == ours:
            return
        self._check_generation_tags = False
        k = next((k for k, (a, b) in enumerate(zip(ours, theirs["assistant_masks"])) if a != b), min(len(ours), len(
            theirs["assistant_masks"])))
        token = self.tokenizer.decode(ids[k:k + 1]) if k < len(ids) else "(end)"
        log.warning("%s: the chat template's {%% generation %%} tags mark %d tokens, posttrain's assistant turns %d "
                    "(first difference at token %d, %r); training on posttrain's: each assistant turn as rendered, "
                    "with its end-of-turn marker", conv.source or "a row", sum(theirs["assistant_masks"]), sum(ours),
                    k, token)

    def _tokenized(self, conv: Conversation) -> tuple[str, list[int], list[tuple[int, int]], list[int]]:
        """The rendering, its ids, their character offsets and their labels."""
        full, turns = self.turns(conv)
        ids, offsets = self._encode_with_offsets(full)
        spans = [(0, len(full))] if self.train_on_prompt else [(t.start, t.end) for t in turns]
        return full, ids, offsets, _labels(ids, offsets, spans)

    def response_sample(self, prompt: list[Message], response: Message, tools, source: str = "") -> TokenizedSample:
        """A preference / KTO response after its prompt: the prompt's ids are what generation sees
        (its generation prompt), the response's are the ones inference produces after them, up to its
        end-of-turn marker, and only the response is trained."""
        conv = Conversation(messages=[*prompt, response], tools=tools, source=source)
        full, turns = self.turns(conv, last_only=True)
        if not turns:
            raise DataError("the response is marked not to be trained (loss_weight 0)", source or None)
        turn = turns[-1]
        # Usually the whole rendering up to the marker; Mistral's, whose prompt alone differs (system
        # prompt), is the generation prompt followed by the turn as the template writes it.
        prompt_text = self._render([m.to_dict() for m in prompt], tools, True, source)
        text = prompt_text + full[turn.begin:turn.end]
        ids, offsets = self._continue(prompt_text, text)
        return TokenizedSample(ids, _labels(ids, offsets, [(len(prompt_text) + turn.start - turn.begin, len(text))]),
                               source)

    def _continue(self, prompt_text: str, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and offsets of `text`, whose first ids are exactly the prompt's: generation appends to the
        prompt's ids and never merges its first token into the prompt's last (tokenizing the two in
        one piece could, e.g. "\n" + "\n")."""
        ids, offsets = self._encode_with_offsets(text)
        prompt_ids = self.encode(prompt_text)
        cut = next((k for k, (a, _) in enumerate(offsets) if a >= len(prompt_text)), len(ids))
        if ids[:cut] == prompt_ids:
            return ids, offsets
        resume = offsets[cut][0] if cut < len(ids) else len(text)
        mid_ids, mid_offsets = self._encode_with_offsets(text[len(prompt_text):resume])
        shifted = [(a + len(prompt_text), b + len(prompt_text)) for a, b in mid_offsets]
        return prompt_ids + mid_ids + ids[cut:], [(0, 0)] * len(prompt_ids) + shifted + offsets[cut:]

    def prompt_ids(self, conv: Conversation) -> list[int]:
        """Token ids of the conversation up to (not including) its last assistant turn, ready to generate."""
        last = max(i for i, m in enumerate(conv.messages) if m.role == "assistant")
        return self.encode(self.render(conv, upto=last, generation_prompt=True))

    def generation_prompt_ids(self, conv: Conversation) -> list[int]:
        """Token ids of the whole conversation plus the generation prompt: what the model answers (RL)."""
        return self.encode(self.render(conv, generation_prompt=True))

    def pieces(self, conv: Conversation) -> list[tuple[str, bool]]:
        """The rendered text cut into (text, trained) pieces, a piece trained when its tokens are; their
        concatenation is the full render."""
        if conv.is_text:
            return [(conv.text + (self.tokenizer.eos_token or ""), True)]
        full, _, offsets, labels = self._tokenized(conv)
        out: list[tuple[str, bool]] = []
        pos = 0
        for (a, b), label in zip(offsets, labels):
            trained = label != IGNORE_INDEX
            if b <= pos:
                continue
            if out and out[-1][1] == trained:
                out[-1] = (out[-1][0] + full[pos:b], trained)
            else:
                out.append((full[pos:b], trained))
            pos = b
        if pos < len(full):
            out.append((full[pos:], False))
        return out


def _labels(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """ids where a token overlaps a trained character span, IGNORE_INDEX elsewhere. Token offsets are
    in order, so each span's tokens are found by bisection."""
    starts = [a for a, _ in offsets]
    ends = [b for _, b in offsets]
    labels = [IGNORE_INDEX] * len(ids)
    for first, last in spans:
        i, j = bisect_right(ends, first), bisect_left(starts, last)  # tokens ending after / starting before
        labels[i:j] = ids[i:j]
    return labels


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
