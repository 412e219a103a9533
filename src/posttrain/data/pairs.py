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
from posttrain.data.prepare import Kind, PrepareReport, tokenize_items
from posttrain.data.schema import Message, Preference, Unpaired, preference_from_dict, unpaired_from_dict


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


def _pair_sequences(renderer: ChatRenderer, p: Preference) -> list[TokenizedSample]:
    return [tokenize_response(renderer, p.prompt, p.chosen, p.tools, p.source),
            tokenize_response(renderer, p.prompt, p.rejected, p.tools, p.source)]


def _pair_sample(seqs: list[TokenizedSample], p: Preference) -> PairSample:
    return PairSample(seqs[0], seqs[1], p.margin or 0.0, p.source)


PAIRS = Kind("pairs", "pairs", _pair_sequences, _pair_sample, preference_from_dict)


def tokenize_pairs(pairs: list[Preference], renderer: ChatRenderer, cutoff_len: int, overlong: str = "truncate"
                   ) -> tuple[list[PairSample], PrepareReport]:
    """Both responses of every pair, cut to cutoff_len (a pair counts as one sample in the report)."""
    return tokenize_items(PAIRS, pairs, renderer, cutoff_len, overlong)


@dataclass
class UnpairedItem:
    """A KTO row and the completion of the row after it, which follows its prompt in the mismatched
    sequence (one item, so each row tokenizes on its own, in any process)."""

    row: Unpaired
    other: Message


def unpaired_items(rows: list[Unpaired]) -> list[UnpairedItem]:
    """Each row with the NEXT row's completion (a fixed pairing, so the reference log-probs of the
    mismatched sequences can be computed once, like the others)."""
    return [UnpairedItem(row, rows[(i + 1) % len(rows)].completion) for i, row in enumerate(rows)]


def _unpaired_sequences(renderer: ChatRenderer, item: UnpairedItem) -> list[TokenizedSample]:
    row = item.row
    return [tokenize_response(renderer, row.prompt, row.completion, row.tools, row.source),
            tokenize_response(renderer, row.prompt, item.other, row.tools, row.source)]


def _unpaired_sample(seqs: list[TokenizedSample], item: UnpairedItem) -> UnpairedSample:
    return UnpairedSample(seqs[0], item.row.label, seqs[1], item.row.source)


def _unpaired_item_from_dict(d: dict) -> UnpairedItem:
    return UnpairedItem(unpaired_from_dict(d["row"]), Message(**d["other"]))


UNPAIRED = Kind("unpaired", "rows", _unpaired_sequences, _unpaired_sample, _unpaired_item_from_dict)


def tokenize_unpaired(rows: list[Unpaired], renderer: ChatRenderer, cutoff_len: int, overlong: str = "truncate"
                      ) -> tuple[list[UnpairedSample], PrepareReport]:
    """Each row, plus its prompt followed by the NEXT row's completion (`unpaired_items`)."""
    return tokenize_items(UNPAIRED, unpaired_items(rows), renderer, cutoff_len, overlong)


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


def count_pairs(batch: dict) -> int:
    """What a batch of pairs counts in the loop's mean: its pairs."""
    return int(batch["num_pairs"])


def collate_unpaired(samples: list[UnpairedSample], pad_id: int) -> dict:
    """2B rows (the B completions, then the B mismatched ones) + labels and reference log-probs."""
    batch = _collate_two_sides(samples, "sample", "mismatched", ("ref", "ref_mismatched"), pad_id)
    batch["label"] = torch.tensor([s.label for s in samples], dtype=torch.bool)
    batch["num_rows"] = len(samples)
    return batch


def count_rows(batch: dict) -> int:
    """What a batch of KTO rows counts in the loop's mean: its rows."""
    return int(batch["num_rows"])
