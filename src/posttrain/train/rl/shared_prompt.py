"""Forward passes that read each distinct prompt once, however many completions of it a batch holds.

A GRPO step samples `num_generations` completions of every prompt, so a plain batch of
prompt + response rows runs each prompt through the model once per completion. Here the distinct
prompts (all but their last token) run once, with the KV cache on; the cache is then indexed out
to one row per completion, and the completions run on top of it. Indexing is differentiable
(its backward adds every row's gradient into its prompt), so log-probs AND gradients are those of
the plain per-row forward, up to float rounding.

Layout (all right-padded):
  prompt_ids / prompt_mask [U, P]  the distinct prompts without their last token
  rows [B]                         which prompt each row continues
  tail_ids / tail_pos [B, L]       the prompt's last token, then the response without its last token,
                                   at their true positions (p-1, p, ...): hidden state j predicts
                                   response token j, so outputs come response-aligned, no gather
  targets / mask [B, L]            as in the plain layout
  chunks                           the tail passes: rows grouped by response length, each group padded only
                                   to its own longest (GRPO's completions of one step differ a lot in length)
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from posttrain.train.rl.rollout import Rollout


# Where the shared layout pays on a GPU. It runs the decoder twice (prompts, then completions on their cache),
# so it launches twice the kernels, and small models are bound by that host work, not by arithmetic: on an
# H100 (bf16, 4-16-layer Llamas of 19M-934M parameters, 32 rows of 4 prompts) an update micro-batch took
# 2-3.5 ms more per decoder layer with the GPU's own work unchanged, so skipping prompt tokens only paid once
# their forward + backward (6 x params FLOPs each, at the ~200 TFLOP/s those runs reached) outweighed it:
# 215M params x 14k skipped positions / 12 layers paid (-33 ms), x 3.6k did not (+34 ms); 934M x 3.6k / 16
# paid (-9 ms), x 900 did not (+42 ms). Hence params x skipped positions >= this, per layer.
GPU_SHARING_BREAK_EVEN = 1e11
# A CPU launches nothing, but each op still costs its dispatch: one more decoder pass cost ~2 ms per layer
# (forward + backward, 2 cores, fp32) where a position cost ~6 x params / 200 GFLOP/s. The same rule, with this.
CPU_SHARING_BREAK_EVEN = 7e7


def min_saved_positions(model: nn.Module, device: torch.device) -> int:
    """The fewest token positions one more decoder pass (the shared layout's, or a tail pass of its) must skip
    to be run for `model` on `device`."""
    params = sum(p.numel() for p in model.parameters())
    layers = getattr(getattr(model, "config", None), "num_hidden_layers", 1)
    per_layer = GPU_SHARING_BREAK_EVEN if device.type == "cuda" else CPU_SHARING_BREAK_EVEN
    return max(1, math.ceil(per_layer * layers / params))


def worth_sharing(rollouts: list[Rollout], min_saved: int = 1) -> bool:
    """Whether the shared layout runs at least `min_saved` fewer token positions than the plain one (it needs
    a repeated prompt to gain anything, and prompts of 2+ tokens so no cached prompt row is empty)."""
    if any(len(r.prompt_ids) < 2 for r in rollouts) or not any(r.response_ids for r in rollouts):
        return False
    distinct = {tuple(r.prompt_ids): len(r.prompt_ids) - 1 for r in rollouts}
    if len(distinct) == len(rollouts):
        return False
    plain = len(rollouts) * max(len(r.prompt_ids) + len(r.response_ids) for r in rollouts)
    shared = len(distinct) * max(distinct.values()) + len(rollouts) * max(len(r.response_ids) for r in rollouts)
    return plain - shared >= max(1, min_saved)


MAX_TAIL_PASSES = 4  # tail passes per forward: each keeps its own activations and runs the decoder once more


def tail_chunks(lengths: list[int], pass_cost: int, max_passes: int = MAX_TAIL_PASSES) -> list[list[int]]:
    """Rows (indices into `lengths`, the tail lengths) in groups run as one tail pass each, padded to the
    group's longest: of the groupings into runs of the rows sorted by length, the one that computes the fewest
    positions, counting each pass after the first as `pass_cost` positions (min_saved_positions)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    ranked = [lengths[i] for i in order]
    cuts = [i for i in range(1, len(ranked)) if ranked[i] < ranked[i - 1]]  # a group starts where a length drops
    starts = [0] + cuts
    n = len(ranked)
    # best[k][j]: fewest positions for rows ranked[starts[j]:] in k more passes; a pass from starts[j] to the
    # next group start pads to ranked[starts[j]], the longest of its rows
    inf = float("inf")
    best = [[inf] * (len(starts) + 1) for _ in range(max_passes + 1)]
    choice: dict[tuple[int, int], int] = {}
    for k in range(max_passes + 1):
        best[k][len(starts)] = 0
    for k in range(1, max_passes + 1):
        for j in range(len(starts) - 1, -1, -1):
            for e in range(len(starts), j, -1):  # fewer passes first: a pass that only breaks even is not run
                end = starts[e] if e < len(starts) else n
                cost = (end - starts[j]) * ranked[starts[j]] + (pass_cost if e < len(starts) else 0) + best[k - 1][e]
                if cost < best[k][j]:
                    best[k][j], choice[k, j] = cost, e
    groups, j, k = [], 0, max_passes
    while j < len(starts):
        e = choice[k, j]
        end = starts[e] if e < len(starts) else n
        groups.append(order[starts[j]:end])
        j, k = e, k - 1
    return groups


def collate_shared(rollouts: list[Rollout], pad_id: int, device: torch.device, min_saved: int = 1) -> dict:
    """The layout above for these rollouts (any order: equal prompt ids share one prompt row); at least
    one response must be non-empty (`worth_sharing` checks it). `min_saved`: what one more tail pass must
    save, in positions, to be run (min_saved_positions)."""
    index: dict[tuple, int] = {}
    rows = [index.setdefault(tuple(r.prompt_ids), len(index)) for r in rollouts]
    prompts = list(index)
    width = max(len(p) for p in prompts) - 1
    prompt_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for u, p in enumerate(prompts):
        prompt_ids[u, :len(p) - 1] = torch.tensor(p[:-1])
        prompt_mask[u, :len(p) - 1] = 1
    b, length = len(rollouts), max(len(r.response_ids) for r in rollouts)
    tail_ids = torch.full((b, length), pad_id, dtype=torch.long)
    targets = torch.full((b, length), pad_id, dtype=torch.long)
    mask = torch.zeros((b, length))
    tail_pos = torch.zeros((b, length), dtype=torch.long)
    for i, r in enumerate(rollouts):
        p, n = len(r.prompt_ids), len(r.response_ids)
        tail = [r.prompt_ids[-1]] + r.response_ids[:-1]  # n tokens (1 for an empty response, masked)
        tail_ids[i, :len(tail)] = torch.tensor(tail)
        tail_pos[i] = torch.arange(length) + p - 1  # padding keeps counting: any position serves a masked token
        targets[i, :n] = torch.tensor(r.response_ids)
        mask[i, :n] = 1
    batch = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "rows": torch.tensor(rows), "tail_ids": tail_ids,
             "tail_pos": tail_pos, "targets": targets, "mask": mask}
    batch = {k: v.to(device) for k, v in batch.items()}
    tails = [max(1, len(r.response_ids)) for r in rollouts]
    groups = tail_chunks(tails, min_saved)
    if len(groups) > 1:
        batch["chunks"] = [(torch.tensor(g, device=device), max(tails[i] for i in g)) for g in groups]
        # the rows in the order the passes give them back -> each row's place there
        batch["chunk_rows"] = torch.argsort(torch.tensor([i for g in groups for i in g])).to(device)
    return batch


def shared_hidden(body: nn.Module, batch: dict) -> torch.Tensor:
    """The decoder's last hidden state before each response token, [B, L, H], from the shared layout.
    `body` is the bare decoder (e.g. LlamaModel) of a causal LM or of a reward model."""
    prompt = body(input_ids=batch["prompt_ids"], attention_mask=batch["prompt_mask"], use_cache=True)
    if "chunks" not in batch:
        return _tail_pass(body, batch, prompt.cache, batch["rows"], batch["tail_ids"], batch["tail_pos"])
    width = batch["tail_ids"].size(1)
    parts = []
    for idx, length in batch["chunks"]:
        cache = copy.copy(prompt.cache)  # each pass selects its own rows of the prompts' keys and values
        cache.layers = [copy.copy(layer) for layer in prompt.cache.layers]
        hidden = _tail_pass(body, batch, cache, batch["rows"][idx], batch["tail_ids"][idx, :length],
                            batch["tail_pos"][idx, :length])
        parts.append(nn.functional.pad(hidden, (0, 0, 0, width - length)))
    return torch.cat(parts)[batch["chunk_rows"]]


def _tail_pass(body: nn.Module, batch: dict, cache, rows: torch.Tensor, tail_ids: torch.Tensor,
               tail_pos: torch.Tensor) -> torch.Tensor:
    cache.batch_select_indices(rows)  # one row per completion; backward sums them per prompt
    # Tail tokens are never masked as keys: a padding tail token is only seen by later padding queries,
    # whose outputs are dropped. Prompt padding is masked, so each row sees exactly its own prompt.
    attention = torch.cat([batch["prompt_mask"][rows], torch.ones_like(tail_ids)], dim=1)
    out = body(input_ids=tail_ids, attention_mask=attention, position_ids=tail_pos, cache=cache, use_cache=True)
    return out.last_hidden_state
