"""Conversations to training samples: tokenize, apply the cutoff policy, split off eval rows.

Everything here runs before the first training step, so bad data fails fast and the log says how
many samples were cut or dropped and why.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from posttrain.data.chat import IGNORE_INDEX, ChatRenderer, TokenizedSample
from posttrain.data.schema import Conversation
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


def tokenize_all(conversations: list[Conversation], renderer: ChatRenderer, cutoff_len: int,
                 overlong: str = "truncate") -> tuple[list[TokenizedSample], PrepareReport]:
    report = PrepareReport()
    out: list[TokenizedSample] = []
    for conv in conversations:
        sample = renderer.tokenize(conv)  # a row the template cannot render is a DataError naming it
        if len(sample.input_ids) > cutoff_len:
            if overlong == "drop":
                report.dropped_overlong += 1
                continue
            sample = truncate(sample, cutoff_len)
            report.truncated += 1
        n_trained = sum(1 for x in sample.labels[1:] if x != IGNORE_INDEX)  # the first token is never predicted
        if n_trained == 0:
            report.dropped_untrained += 1
            continue
        out.append(sample)
        report.total_tokens += len(sample.input_ids)
        report.trained_tokens += n_trained
    report.samples = len(out)
    if not out:
        raise DataError(f"no trainable samples left ({report.summary()}); raise cutoff_len or check the data")
    return out, report


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
