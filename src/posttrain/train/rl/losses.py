"""The losses of the update, per token, and how they are summed into the loop's (sum, units) form.

Notation: ρ_t = π(a_t|s_t) / π_old(a_t|s_t), A_t the advantage, ε = cliprange.

  policy   L = -min(ρ A, clip(ρ, 1-ε, 1+ε_high) A)            (Schulman et al. 2017, "PPO", eq. 7)
           dual-clip: for A < 0, L = min(L, -c A)               (Ye et al. 2020, "Mastering Complex
                                                                 Control in MOBA Games with DRL")
  value    L = ½ max((V - R)², (V_old + clip(V - V_old, ±ε_v) - R)²)   (the PPO2 / OpenAI baselines form)
  entropy  H = -Σ_v π(v|s) log π(v|s) over the vocabulary, subtracted with entropy_coef
  KL loss  kl_coef · k(π, π_ref) per token, when use_kl_loss (GRPO)

Aggregation (`loss_agg_mode`): the loop divides the summed loss by the units of the whole optimizer
step, so each mode is a (per-token weight, units) pair:
  token_mean               Σ over tokens / tokens in the step           (every token counts the same)
  seq_mean_token_mean      Σ_seq (Σ_t / |seq|) / sequences              (GRPO's original form)
  seq_mean_token_sum_norm  Σ_seq (Σ_t / L_max) / sequences              (Dr.GRPO: no length bias)
"""

from __future__ import annotations

import torch

from posttrain.config import LOSS_AGG_MODES


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, cliprange: float,
                cliprange_high: float | None = None, dual_clip: float | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss per token, 1.0 where the clip was active) for tensors of the same shape."""
    ratio = torch.exp(logp - old_logp)
    surr1 = ratio * advantages
    surr2 = ratio.clamp(1 - cliprange, 1 + (cliprange_high or cliprange)) * advantages
    loss = -torch.min(surr1, surr2)
    clipped = (surr2 < surr1).float()
    if dual_clip is not None:
        loss = torch.where(advantages < 0, torch.min(loss, -dual_clip * advantages), loss)
    return loss, clipped


def tis_weights(old_logp: torch.Tensor, sampler_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance sampling (Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You
    Off-Policy RL Training"): w = min(pi_old / pi_sampler, cap) per token, without gradient. The rollout
    engine (vLLM: other kernels, other precision) samples a policy slightly unlike the one trained; the
    weight corrects the policy gradient for it, and the cap bounds its variance."""
    return torch.exp(old_logp - sampler_logp).clamp(max=cap).detach()


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, cliprange_value: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss per token, 1.0 where the clipped term was the larger)."""
    clipped_values = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    plain, clipped = (values - returns) ** 2, (clipped_values - returns) ** 2
    return 0.5 * torch.max(plain, clipped), (clipped > plain).float()


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def token_weights(mask: torch.Tensor, mode: str, max_len: int) -> torch.Tensor:
    """The weight of each token [B, L] in the loss sum for `loss_agg_mode`; the sum is divided by
    the `loss_units` of the whole mini-batch."""
    if mode == "token_mean":
        return mask
    if mode == "seq_mean_token_mean":
        return mask / mask.sum(dim=1, keepdim=True).clamp(min=1)
    if mode == "seq_mean_token_sum_norm":
        return mask / max_len
    raise ValueError(f"unknown loss_agg_mode {mode!r}")


def loss_units(lengths: list[int], mode: str) -> int:
    """What the loss is a mean over, for responses of these lengths: tokens (token_mean) or rows."""
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"unknown loss_agg_mode {mode!r}")
    return sum(lengths) if mode == "token_mean" else len(lengths)
