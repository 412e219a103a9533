"""Generated tokens to text, one token at a time, with stop strings.

Decoding token by token is wrong for byte-level and sentencepiece tokenizers (a character may span
tokens; a leading space depends on the previous token), so each step decodes a short window of
recent tokens twice — without and with the new one — and keeps the difference once it is no longer
an incomplete character. The window starts with the prompt's last tokens for the same reason.

Stop strings: the text ends right before the first occurrence. While streaming, the tail of the
text that could still grow into a stop string is held back, so a client never sees part of one.
"""

from __future__ import annotations

PROMPT_CONTEXT = 6  # prompt tokens kept as decoding context for the first generated tokens


def decode_continuation(tokenizer, prompt_ids: list[int], ids: list[int]) -> str:
    """The text `ids` add after the prompt, all at once: what a TextTracker's deltas add up to. Decoding `ids`
    alone would drop a leading space that a sentencepiece token owes to the token before it."""
    context = list(prompt_ids[-PROMPT_CONTEXT:])
    before = tokenizer.decode(context, skip_special_tokens=True)
    full = tokenizer.decode(context + list(ids), skip_special_tokens=True)
    if full.startswith(before):
        return full[len(before):]
    return tokenizer.decode(ids, skip_special_tokens=True)  # the context decoded differently: no shared prefix


class TextTracker:
    def __init__(self, tokenizer, prompt_ids: list[int], stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stop = list(stop or [])
        self.ids = list(prompt_ids[-PROMPT_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""
        self.emitted = 0  # characters of `text` already handed out as deltas
        self.stopped = False  # a stop string was found; text ends before it

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> bool:
        """Append a generated token; True when the text now contains a stop string."""
        self.ids.append(token)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self._append(full[len(prefix):])
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
        return self.stopped

    def flush(self) -> None:
        """The sequence ended: keep whatever the last tokens decode to, even an incomplete character."""
        if self.read_offset < len(self.ids) and not self.stopped:
            prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
            full = self._decode(self.ids[self.prefix_offset:])
            self._append(full[len(prefix):])
            self.read_offset = len(self.ids)

    def _append(self, new: str) -> None:
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0) + 1)
        self.text += new
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True

    def take_delta(self, final: bool = False) -> str:
        """Text not handed out yet; unless final, minus a tail that may be the start of a stop string."""
        end = len(self.text)
        if not final and self.stop:
            for s in self.stop:
                for n in range(min(len(s) - 1, end), 0, -1):
                    if self.text.endswith(s[:n]):
                        end = min(end, len(self.text) - n)
                        break
        end = max(end, self.emitted)
        delta = self.text[self.emitted:end]
        self.emitted = end
        return delta
