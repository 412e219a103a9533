"""Conversations to training samples: tokenize, apply the cutoff policy, split off eval rows.

Everything here runs before the first training step, so bad data fails fast and the log says how
many samples were cut or dropped and why.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable

from posttrain.data.chat import IGNORE_INDEX, ChatRenderer, TokenizedSample
from posttrain.data.schema import Conversation, conversation_from_dict
from posttrain.errors import DataError


@dataclass
class PrepareReport:
    samples: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    dropped_untrained: int = 0  # nothing left to train after the cut
    total_tokens: int = 0
    trained_tokens: int = 0
    examples: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{self.samples} samples, {self.total_tokens} tokens ({self.trained_tokens} trained)"]
        if self.truncated:
            parts.append(f"{self.truncated} cut to cutoff_len")
        if self.dropped_overlong:
            parts.append(f"{self.dropped_overlong} dropped as longer than cutoff_len")
        if self.dropped_untrained:
            parts.append(f"{self.dropped_untrained} dropped with no trained token left after the cut")
        return "; ".join(parts)


def truncate(sample: TokenizedSample, cutoff_len: int) -> TokenizedSample:
    """The one cutoff rule, for every stage and for `posttrain score`: keep the FIRST cutoff_len
    tokens. The prompt and the start of the response survive, as the model reads them left to right;
    what is lost is the response's end. A reward model reads its score at the last token, so a cut
    row is scored at the cut, in `posttrain rm` training and in `posttrain score` alike (scoring with
    another rule would read the head at positions it was never trained on)."""
    if len(sample.input_ids) <= cutoff_len:
        return sample
    return TokenizedSample(sample.input_ids[:cutoff_len], sample.labels[:cutoff_len], sample.source)


def cut(seqs: list[TokenizedSample], cutoff_len: int, overlong: str
        ) -> tuple[list[TokenizedSample] | None, bool, str]:
    """The cutoff policy for one item's sequences (a conversation, a pair, a KTO row and its twin):
    (what is kept or None, whether it was cut, why it is dropped: "", "overlong" or "untrained").
    An item is dropped whole when any of its sequences is overlong under overlong="drop", or has no
    trained token left after the cut."""
    truncated = False
    if any(len(s.input_ids) > cutoff_len for s in seqs):
        if overlong == "drop":
            return None, False, "overlong"
        seqs, truncated = [truncate(s, cutoff_len) for s in seqs], True
    if any(_trained(s) == 0 for s in seqs):
        return None, truncated, "untrained"
    return seqs, truncated, ""


def _trained(sample: TokenizedSample) -> int:
    return sum(1 for x in sample.labels[1:] if x != IGNORE_INDEX)  # the first token is never predicted


class CutoffCounter:
    """Applies cutoff_len to the sequences of one item with the shared rule (`cut`), and keeps the
    report. `record` adds an item already cut elsewhere (another process, or the tokenized cache)."""

    def __init__(self, cutoff_len: int, overlong: str):
        self.cutoff_len, self.overlong = cutoff_len, overlong
        self.report = PrepareReport()

    def __call__(self, seqs: list[TokenizedSample]) -> list[TokenizedSample] | None:
        return self.record(*cut(seqs, self.cutoff_len, self.overlong))

    def record(self, seqs: list[TokenizedSample] | None, truncated: bool, dropped: str
               ) -> list[TokenizedSample] | None:
        self.report.truncated += truncated
        if dropped == "overlong":
            self.report.dropped_overlong += 1
        elif dropped == "untrained":
            self.report.dropped_untrained += 1
        else:
            self.report.samples += 1
            self.report.total_tokens += sum(len(s.input_ids) for s in seqs)
            self.report.trained_tokens += sum(_trained(s) for s in seqs)
        return seqs if not dropped else None

    def finish(self, out: list, what: str) -> PrepareReport:
        if not out:
            raise DataError(f"no trainable {what} left ({self.report.summary()}); raise cutoff_len or check the data")
        return self.report


@dataclass(frozen=True)
class Kind:
    """What one stage tokenizes, item by item, so the same steps run in this process, in `datasets`
    worker processes, or not at all when the tokenized cache has them (data/cache.py):
    `sequences(renderer, item)` tokenizes an item, `build(seqs, item)` makes the training sample of
    the kept sequences, `from_dict` makes the item again from its fields (it travels to a worker as JSON)."""

    name: str
    what: str  # what the report counts: samples, pairs, rows
    sequences: Callable[[ChatRenderer, Any], list[TokenizedSample]]
    build: Callable[[list[TokenizedSample], Any], Any]
    from_dict: Callable[[dict], Any]


def tokenize_items(kind: Kind, items: list, renderer: ChatRenderer, cutoff_len: int, overlong: str = "truncate"
                   ) -> tuple[list, PrepareReport]:
    """Every item tokenized and cut in this process, in order, with the report."""
    cutoff = CutoffCounter(cutoff_len, overlong)
    out = []
    for item in items:
        seqs = cutoff(kind.sequences(renderer, item))  # a row the template cannot render is a DataError naming it
        if seqs is not None:
            out.append(kind.build(seqs, item))
    return out, cutoff.finish(out, kind.what)


def _conversation_sequences(renderer: ChatRenderer, conv: Conversation) -> list[TokenizedSample]:
    return [renderer.tokenize(conv)]


def _first(seqs: list[TokenizedSample], _item) -> TokenizedSample:
    return seqs[0]


SFT = Kind("sft", "samples", _conversation_sequences, _first, conversation_from_dict)


def tokenize_all(conversations: list[Conversation], renderer: ChatRenderer, cutoff_len: int,
                 overlong: str = "truncate") -> tuple[list[TokenizedSample], PrepareReport]:
    return tokenize_items(SFT, conversations, renderer, cutoff_len, overlong)


def split_eval(items: list, val_size: float, seed: int) -> tuple[list, list]:
    """Hold out `val_size` (a fraction < 1, or a count) of the rows, chosen by seed."""
    if not val_size:
        return items, []
    n = int(val_size) if val_size >= 1 else int(round(len(items) * val_size))
    if n <= 0 or n >= len(items):
        raise DataError(f"val_size={val_size} leaves {len(items) - max(n, 0)} of {len(items)} rows for training; "
                        "choose a smaller val_size")
    idx = list(range(len(items)))
    random.Random(seed).shuffle(idx)
    held = set(idx[:n])
    return [x for i, x in enumerate(items) if i not in held], [items[i] for i in sorted(held)]
