"""Samples to tensors: which samples go in which micro-batch, padding, and packing.

Targets are shifted here, per sample (`targets[t]` is the token at t+1 when that token is
trained), so a packed row never asks a sample's last token to predict the next sample's first.
Packed rows carry per-sample position ids and no attention mask; transformers then builds a
block-diagonal causal mask from the position ids, which SDPA honours on CPU and GPU alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from posttrain.data.chat import IGNORE_INDEX, TokenizedSample


def shifted_targets(labels: list[int]) -> list[int]:
    return labels[1:] + [IGNORE_INDEX]


@dataclass
class PackedRow:
    """Several samples laid end to end in one row."""

    samples: list[TokenizedSample]

    @property
    def input_ids(self) -> list[int]:
        return [t for s in self.samples for t in s.input_ids]

    def __len__(self) -> int:
        return sum(len(s.input_ids) for s in self.samples)


def pack(samples: list[TokenizedSample], max_len: int) -> list[PackedRow]:
    """First-fit-decreasing bin packing of samples into rows of at most `max_len` tokens."""
    order = sorted(range(len(samples)), key=lambda i: -len(samples[i].input_ids))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(samples[i].input_ids)
        for r, free in enumerate(room):
            if free >= n:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(max_len - n)
    return [PackedRow([samples[i] for i in sorted(r)]) for r in rows]


def example_length(example) -> int:
    """Tokens in a sample; a packed row or a preference pair says itself (`len`)."""
    return len(example.input_ids) if isinstance(example, TokenizedSample) else len(example)


def collate(examples: list, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch of samples or packed rows.

    Returns input_ids, targets (shifted, IGNORE_INDEX where untrained) and either attention_mask
    (plain samples) or position_ids (packed rows: positions restart at every sample, and the
    padding tail is a segment of its own whose targets are all ignored).
    """
    width = max(example_length(e) for e in examples)
    packed = isinstance(examples[0], PackedRow)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    batch: dict[str, torch.Tensor] = {}
    if packed:
        positions = torch.zeros((len(examples), width), dtype=torch.long)
        for b, row in enumerate(examples):
            pos = 0
            for s in row.samples:
                n = len(s.input_ids)
                ids[b, pos:pos + n] = torch.tensor(s.input_ids)
                targets[b, pos:pos + n] = torch.tensor(shifted_targets(s.labels))
                positions[b, pos:pos + n] = torch.arange(n)
                pos += n
            positions[b, pos:] = torch.arange(width - pos)
        batch["position_ids"] = positions
    else:
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for b, s in enumerate(examples):
            n = len(s.input_ids)
            ids[b, :n] = torch.tensor(s.input_ids)
            targets[b, :n] = torch.tensor(shifted_targets(s.labels))
            mask[b, :n] = 1
        batch["attention_mask"] = mask
    batch["input_ids"] = ids
    batch["targets"] = targets
    return batch


def plan_epoch(lengths: list[int], *, epoch: int, seed: int, micro_batch_size: int, accumulation: int,
               world_size: int, rank: int, group_by_length: bool) -> list[list[list[int]]]:
    """The example indices this rank trains on in one epoch: steps -> micro-batches -> indices.

    Every rank computes the same global plan from (seed, epoch) and takes its share, so a run on
    N processes sees the same global batches as one process with N times the accumulation. The
    last, partial global batch is spread over the ranks too; a rank may then get an empty
    micro-batch, which the loop runs as a zero-weight step so collective calls stay in step.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=g).tolist()
    global_size = micro_batch_size * accumulation * world_size
    batches = [order[i:i + global_size] for i in range(0, len(order), global_size)]
    if group_by_length and len(batches) > 1:
        # Sort within large windows so each batch holds similar lengths (little padding), then shuffle
        # the batches so the model does not see lengths in order.
        window = global_size * 64
        batches = []
        for w in range(0, len(order), window):
            chunk = sorted(order[w:w + window], key=lambda i: -lengths[i])
            batches += [chunk[i:i + global_size] for i in range(0, len(chunk), global_size)]
        full = [b for b in batches if len(b) == global_size]
        partial = [b for b in batches if len(b) < global_size]
        perm = torch.randperm(len(full), generator=g).tolist()
        batches = [full[i] for i in perm] + partial
    steps = []
    chunks_per_step = accumulation * world_size
    for batch in batches:
        ordered = sorted(batch, key=lambda i: -lengths[i]) if group_by_length else batch
        per_chunk = math.ceil(len(ordered) / chunks_per_step)
        chunks = [ordered[c * per_chunk:(c + 1) * per_chunk] for c in range(chunks_per_step)]
        steps.append([chunks[m * world_size + rank] for m in range(accumulation)])
    return steps
