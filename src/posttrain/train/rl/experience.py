"""A rollout as training tensors, and the forward passes that read response tokens from a batch.

Sequences are prompt + response, right-padded (so positions are the plain 0..n-1 every model
expects). Everything per token is response-aligned, [B, L]: column j of row b is the j-th response
token, predicted from the hidden state one position earlier. The output head and the value head
run on those positions only, never on the prompt.

Where a batch holds several completions of one prompt (GRPO's groups), `collate_rollouts` can
instead give the shared-prompt layout of shared_prompt.py (each prompt run once); the forward
passes here read either layout and return the same [B, L] tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from posttrain.errors import ConfigError
from posttrain.model.parts import causal_parts, is_checkpointing, prompt_learning_config, value_parts
from posttrain.model.reward import token_values
from posttrain.train.rl.losses import entropy_from_logits
from posttrain.train.rl.rollout import Rollout
from posttrain.train.rl.shared_prompt import collate_shared, shared_hidden, worth_sharing


def shares_prompts(model: nn.Module, *, with_grad: bool, critic: bool = False) -> bool:
    """Whether `model` can run the shared-prompt layout: its bare decoder must be reachable (not a
    prompt-learning PEFT model, whose virtual tokens live in the cache; no post-processed logits), its
    layers all full attention (a sliding window counts the cache's slots, prompt padding included), and
    with gradients, no gradient checkpointing (transformers drops the cache in checkpointed layers)."""
    if prompt_learning_config(model) is not None or not full_attention_only(model):
        return False
    if with_grad and is_checkpointing(model):
        return False
    if critic:
        try:
            value_parts(model)
        except ConfigError:
            return False
        return True
    return causal_parts(model) is not None


def full_attention_only(model: nn.Module) -> bool:
    """Whether every layer of `model` attends to all earlier positions (no sliding window, chunked or linear
    attention), as the shared layout's cache of padded prompts needs."""
    config = getattr(model, "config", None)
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    if text is None:
        return False
    if getattr(text, "layer_types", None):
        return all(kind == "full_attention" for kind in text.layer_types)
    if getattr(text, "attention_types", None):  # GPT-Neo's [[["global", "local"], n]]
        return all(kind == "global" for kinds, _ in text.attention_types for kind in kinds)
    if getattr(text, "model_type", None) in ("rwkv", "mamba", "mamba2"):  # recurrent: no cache of keys to share
        return False
    windowed = getattr(text, "sliding_window", None) is not None and getattr(text, "use_sliding_window", True)
    return not windowed and getattr(text, "attention_chunk_size", None) is None


def collate_rollouts(rollouts: list[Rollout], pad_id: int, device: torch.device, share_prompts: bool = False,
                     min_saved: int = 1) -> dict:
    """input_ids / attention_mask [B, T]; `where` [B, L]: the position predicting each response token;
    `targets` and `mask` [B, L]. With `share_prompts`, the shared-prompt layout instead wherever it runs
    at least `min_saved` fewer token positions (rows repeat a prompt; `min_saved_positions`)."""
    if share_prompts and worth_sharing(rollouts, min_saved):
        return collate_shared(rollouts, pad_id, device, min_saved)
    width = max(len(r.prompt_ids) + len(r.response_ids) for r in rollouts)
    length = max(len(r.response_ids) for r in rollouts)
    b = len(rollouts)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    attention = torch.zeros((b, width), dtype=torch.long)
    where = torch.zeros((b, length), dtype=torch.long)
    targets = torch.full((b, length), pad_id, dtype=torch.long)
    mask = torch.zeros((b, length))
    for i, r in enumerate(rollouts):
        p, n = len(r.prompt_ids), len(r.response_ids)
        ids[i, :p + n] = torch.tensor(r.prompt_ids + r.response_ids)
        attention[i, :p + n] = 1
        where[i] = (torch.arange(length) + p - 1).clamp(max=width - 1)
        targets[i, :n] = torch.tensor(r.response_ids)
        mask[i, :n] = 1
    batch = {"input_ids": ids, "attention_mask": attention, "where": where, "targets": targets, "mask": mask}
    return {k: v.to(device) for k, v in batch.items()}


def _gather(hidden: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    return hidden.gather(1, where.unsqueeze(-1).expand(-1, -1, hidden.size(-1)))


def response_logps(model: nn.Module, batch: dict, temperature: float, entropy: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log π(token) [B, L], entropy [B, L] or None) of the response tokens, at the sampling temperature."""
    parts = causal_parts(model)
    if "tail_ids" in batch:  # the shared-prompt layout: hidden states come response-aligned
        if parts is None:
            raise ValueError("the shared-prompt layout needs a model whose decoder and head can be run apart "
                             "(check shares_prompts before collating)")
        body, head = parts
        logits = head(shared_hidden(body, batch))
    else:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if parts is not None:
            body, head = parts
            logits = head(_gather(body(**inputs, use_cache=False).last_hidden_state, batch["where"]))
        else:
            logits = _gather(model(**inputs, use_cache=False).logits, batch["where"])
    logits = logits.float() / temperature
    logp = torch.log_softmax(logits, dim=-1).gather(-1, batch["targets"].unsqueeze(-1)).squeeze(-1)
    ent = entropy_from_logits(logits) if entropy else None
    return logp * batch["mask"], ent


def response_values(critic: nn.Module, batch: dict) -> torch.Tensor:
    """The critic's V(s) [B, L] before each response token."""
    if "tail_ids" in batch:
        body, head = value_parts(critic)
        return head(shared_hidden(body, batch)).squeeze(-1).float() * batch["mask"]
    values = token_values(critic, batch["input_ids"], batch["attention_mask"])
    return values.gather(1, batch["where"]) * batch["mask"]


@dataclass
class Experience:
    """One step's rollouts and what training needs of them, response-aligned [N, L] on the device."""

    rollouts: list[Rollout]
    mask: torch.Tensor
    old_logp: torch.Tensor | None  # None: on-policy single update, the current log-probs are the old ones
    ref_logp: torch.Tensor | None  # None: kl_coef 0
    old_values: torch.Tensor | None  # None: no critic
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    sampler_logp: torch.Tensor | None = None  # the rollout engine's log-probs of the same tokens, where it gave them

    def rows(self, idx: list[int]) -> dict:
        """Per-token tensors of these rows, cut to their longest response."""
        length = max(len(self.rollouts[i].response_ids) for i in idx)  # from the host: no wait for the device
        out = {}
        for name in ("old_logp", "ref_logp", "old_values", "advantages", "returns", "sampler_logp"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value[idx, :length]
        return out


@torch.no_grad()
def score_rollouts(rollouts: list[Rollout], *, actor, reference, critic, pad_id: int, device: torch.device,
                   batch_size: int, temperature: float, need_old: bool, precision, min_saved: int = 1) -> Experience:
    """The old policy's, the reference's and the critic's view of every rollout, batched without gradients.
    `reference` is a model, or "adapter-disabled" for a LoRA actor (its base), or None (no KL), or a
    reference in another process (placement.RayReference), whose log-probs are computed meanwhile. `min_saved`:
    the fewest prompt positions a batch must skip to share its prompts (`min_saved_positions`).
    Rows of one prompt are batched together, so each batch runs each prompt once where every model
    can (shares_prompts)."""
    remote = reference if hasattr(reference, "start") else None  # a reference in another process (placement)
    pending = remote.start(rollouts) if remote is not None else None
    n = len(rollouts)
    length = max(len(r.response_ids) for r in rollouts)
    mask = torch.zeros(n, length, device=device)
    old = torch.zeros(n, length, device=device) if need_old else None
    ref = torch.zeros(n, length, device=device) if reference is not None and remote is None else None
    values = torch.zeros(n, length, device=device) if critic is not None else None
    models = [m for m in (actor, critic) if m is not None] + ([reference] if isinstance(reference, nn.Module) else [])
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    share = shares_prompts(actor, with_grad=False) and (critic is None or shares_prompts(critic, with_grad=False,
                                                                                          critic=True))
    if isinstance(reference, nn.Module):
        share = share and shares_prompts(reference, with_grad=False)
    # Sorted by prompt (length first), then response length: a group stays together, padding stays small.
    order = sorted(range(n), key=lambda i: (len(rollouts[i].prompt_ids), rollouts[i].prompt_ids,
                                            len(rollouts[i].response_ids)))
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        batch = collate_rollouts([rollouts[i] for i in idx], pad_id, device, share, min_saved)
        cols = batch["mask"].size(1)
        mask[idx, :cols] = batch["mask"]
        with precision():
            if old is not None:
                old[idx, :cols] = response_logps(actor, batch, temperature)[0].float()
            if reference == "adapter-disabled":
                with actor.disable_adapter():
                    ref[idx, :cols] = response_logps(actor, batch, temperature)[0].float()
            elif ref is not None:
                ref[idx, :cols] = response_logps(reference, batch, temperature)[0].float()
            if values is not None:
                values[idx, :cols] = response_values(critic, batch).float()
    for m, mode in zip(models, modes):
        m.train(mode)
    if remote is not None:
        ref = remote.finish(pending).to(device)
    return Experience(rollouts, mask, old, ref, values, sampler_logp=_sampler_logps(rollouts, length, device))


def _sampler_logps(rollouts: list[Rollout], length: int, device: torch.device) -> torch.Tensor | None:
    """[N, L] of the rollout engine's log-probs (zero past each response), or None where it gave none."""
    if any(r.logprobs is None or len(r.logprobs) != len(r.response_ids) for r in rollouts):
        return None
    out = torch.zeros(len(rollouts), length)
    for i, r in enumerate(rollouts):
        out[i, :len(r.logprobs)] = torch.tensor(r.logprobs)
    return out.to(device)
