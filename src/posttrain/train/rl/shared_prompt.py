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
"""

from __future__ import annotations

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
# paid (-9 ms), x 900 did not (+42 ms). Hence params x skipped positions >= this, per layer. A CPU launches
# nothing: any saving counts there.
GPU_SHARING_BREAK_EVEN = 1e11


def min_saved_positions(model: nn.Module, device: torch.device) -> int:
    """The fewest token positions the shared layout must skip to be used for `model` on `device`."""
    if device.type != "cuda":
        return 1
    params = sum(p.numel() for p in model.parameters())
    layers = getattr(getattr(model, "config", None), "num_hidden_layers", 1)
    return max(1, math.ceil(GPU_SHARING_BREAK_EVEN * layers / params))


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


def collate_shared(rollouts: list[Rollout], pad_id: int, device: torch.device) -> dict:
    """The layout above for these rollouts (any order: equal prompt ids share one prompt row); at least
    one response must be non-empty (`worth_sharing` checks it)."""
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
    return {k: v.to(device) for k, v in batch.items()}


def shared_hidden(body: nn.Module, batch: dict) -> torch.Tensor:
    """The decoder's last hidden state before each response token, [B, L, H], from the shared layout.
    `body` is the bare decoder (e.g. LlamaModel) of a causal LM or of a reward model."""
    prompt = body(input_ids=batch["prompt_ids"], attention_mask=batch["prompt_mask"], use_cache=True)
    cache = prompt.cache
    cache.batch_select_indices(batch["rows"])  # one row per completion; backward sums them per prompt
    # Tail tokens are never masked as keys: a padding tail token is only seen by later padding queries,
    # whose outputs are dropped. Prompt padding is masked, so each row sees exactly its own prompt.
    attention = torch.cat([batch["prompt_mask"][batch["rows"]], torch.ones_like(batch["tail_ids"])], dim=1)
    out = body(input_ids=batch["tail_ids"], attention_mask=attention, position_ids=batch["tail_pos"], cache=cache,
               use_cache=True)
    return out.last_hidden_state
