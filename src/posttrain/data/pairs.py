"""Preference pairs and unpaired (KTO) rows to tokens, and batches of them to tensors.

Each response follows its prompt as generation sees them: the prompt's ids are its generation prompt
(so both responses of a pair start from the same prompt tokens), the response's ids are the ones
inference produces after it, and only the response (the last assistant turn, with its end-of-turn
token) is trained, located in the template's rendering exactly as SFT locates turns (data/chat.py).

A batch of B pairs is ONE tensor of 2B rows — the B chosen sequences, then the B rejected ones —
so the model runs once per batch, not once per side.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from posttrain.data.batching import collate
from posttrain.data.chat import IGNORE_INDEX, ChatRenderer, TokenizedSample
from posttrain.data.prepare import PrepareReport, truncate
from posttrain.data.schema import Message, Preference, Unpaired
from posttrain.errors import DataError


@dataclass
class PairSample:
    chosen: TokenizedSample
    rejected: TokenizedSample
    margin: float = 0.0
    source: str = ""
    # Reference-model log-probs of each response, filled in once before training (DPO family).
    ref_chosen: float | None = None
    ref_rejected: float | None = None

    def __len__(self) -> int:  # what the batch planner groups by: the padded width this pair needs
        return max(len(self.chosen.input_ids), len(self.rejected.input_ids))

    @property
    def sequences(self) -> list[TokenizedSample]:
        return [self.chosen, self.rejected]

    def set_reference(self, chosen: float, rejected: float) -> None:
        self.ref_chosen, self.ref_rejected = chosen, rejected


@dataclass
class UnpairedSample:
    sample: TokenizedSample  # prompt + completion
    label: bool
    # The same prompt with another row's completion: KTO estimates the KL term on these.
    mismatched: TokenizedSample = None
    source: str = ""
    ref: float | None = None
    ref_mismatched: float | None = None

    def __len__(self) -> int:
        return max(len(self.sample.input_ids), len(self.mismatched.input_ids))

    @property
    def sequences(self) -> list[TokenizedSample]:
        return [self.sample, self.mismatched]

    def set_reference(self, completion: float, mismatched: float) -> None:
        self.ref, self.ref_mismatched = completion, mismatched


def response_renderer(tokenizer, template: str | None, mask_reasoning: bool = False) -> ChatRenderer:
    """A renderer that trains only the last assistant turn: the response being judged."""
    return ChatRenderer(tokenizer, template, train_on_prompt=False, mask_history=True, mask_reasoning=mask_reasoning)


def tokenize_response(renderer: ChatRenderer, prompt: list[Message], response: Message, tools, source: str
                      ) -> TokenizedSample:
    return renderer.response_sample(prompt, response, tools, source)


def _trained(sample: TokenizedSample) -> int:
    return sum(1 for x in sample.labels[1:] if x != IGNORE_INDEX)  # the first token is never predicted


class Cutter:
    """Applies cutoff_len to the sequences of one item (a pair, a KTO row and its twin, a scored
    row) with the shared rule (data/prepare.py `truncate`), and keeps the report: an item is
    dropped whole when any of its sequences is overlong under overlong="drop", or has no trained
    (response) token left."""

    def __init__(self, cutoff_len: int, overlong: str):
        self.cutoff_len, self.overlong = cutoff_len, overlong
        self.report = PrepareReport()

    def __call__(self, seqs: list[TokenizedSample]) -> list[TokenizedSample] | None:
        if any(len(s.input_ids) > self.cutoff_len for s in seqs):
            if self.overlong == "drop":
                self.report.dropped_overlong += 1
                return None
            seqs = [truncate(s, self.cutoff_len) for s in seqs]
            self.report.truncated += 1
        if any(_trained(s) == 0 for s in seqs):
            self.report.dropped_untrained += 1
            return None
        self.report.samples += 1
        self.report.total_tokens += sum(len(s.input_ids) for s in seqs)
        self.report.trained_tokens += sum(_trained(s) for s in seqs)
        return seqs

    def finish(self, out: list, what: str) -> PrepareReport:
        if not out:
            raise DataError(f"no trainable {what} left ({self.report.summary()}); raise cutoff_len or check the data")
        return self.report


def tokenize_pairs(pairs: list[Preference], renderer: ChatRenderer, cutoff_len: int, overlong: str = "truncate"
                   ) -> tuple[list[PairSample], PrepareReport]:
    """Both responses of every pair, cut to cutoff_len (a pair counts as one sample in the report)."""
    cut = Cutter(cutoff_len, overlong)
    out = []
    for p in pairs:
        seqs = cut([tokenize_response(renderer, p.prompt, p.chosen, p.tools, p.source),
                    tokenize_response(renderer, p.prompt, p.rejected, p.tools, p.source)])
        if seqs is not None:
            out.append(PairSample(seqs[0], seqs[1], p.margin or 0.0, p.source))
    return out, cut.finish(out, "pairs")


def tokenize_unpaired(rows: list[Unpaired], renderer: ChatRenderer, cutoff_len: int, overlong: str = "truncate"
                      ) -> tuple[list[UnpairedSample], PrepareReport]:
    """Each row, plus its prompt followed by the NEXT row's completion (a fixed pairing, so the
    reference log-probs of these mismatched sequences can be computed once, like the others)."""
    cut = Cutter(cutoff_len, overlong)
    out = []
    for i, row in enumerate(rows):
        other = rows[(i + 1) % len(rows)]
        seqs = cut([tokenize_response(renderer, row.prompt, row.completion, row.tools, row.source),
                    tokenize_response(renderer, row.prompt, other.completion, row.tools, row.source)])
        if seqs is not None:
            out.append(UnpairedSample(seqs[0], row.label, seqs[1], row.source))
    return out, cut.finish(out, "rows")


def fingerprint(samples: list) -> str:
    """A hash of every token and trained position: it changes with the data, template and cutoff."""
    h = hashlib.sha256()
    for s in samples:
        for seq in s.sequences:
            h.update(len(seq.input_ids).to_bytes(4, "little"))
            h.update(torch.tensor(seq.input_ids, dtype=torch.int64).numpy().tobytes())
            h.update(torch.tensor([x != IGNORE_INDEX for x in seq.labels]).numpy().tobytes())
    return h.hexdigest()


def _collate_two_sides(samples: list, first: str, second: str, ref_keys: tuple[str, str], pad_id: int) -> dict:
    """2B right-padded rows: every sample's `first` sequence, then every sample's `second` one, plus
    the reference log-probs under `ref_keys` once all are filled in (absent before the reference pass)."""
    batch = collate([getattr(s, first) for s in samples] + [getattr(s, second) for s in samples], pad_id)
    for key in ref_keys:
        values = [getattr(s, key) for s in samples]
        if all(v is not None for v in values):
            batch[key] = torch.tensor(values, dtype=torch.float32)
    batch["num_tokens"] = sum(len(q.input_ids) for s in samples for q in s.sequences)
    return batch


def collate_pairs(samples: list[PairSample], pad_id: int) -> dict:
    """2B rows (chosen 0..B-1, rejected B..2B-1) + per-pair margin and reference log-probs."""
    batch = _collate_two_sides(samples, "chosen", "rejected", ("ref_chosen", "ref_rejected"), pad_id)
    batch["margin"] = torch.tensor([s.margin for s in samples], dtype=torch.float32)
    batch["num_pairs"] = len(samples)
    return batch


def collate_unpaired(samples: list[UnpairedSample], pad_id: int) -> dict:
    """2B rows (the B completions, then the B mismatched ones) + labels and reference log-probs."""
    batch = _collate_two_sides(samples, "sample", "mismatched", ("ref", "ref_mismatched"), pad_id)
    batch["label"] = torch.tensor([s.label for s in samples], dtype=torch.bool)
    batch["num_rows"] = len(samples)
    return batch
