"""From rewards to advantages: KL estimators, per-token rewards, GAE, group baselines, whitening.

Shapes: response-aligned tensors [B, L] (row b's response tokens in columns 0..len_b-1) with a
0/1 `mask`; sequence rewards [B]; completions of one prompt are consecutive rows (groups of G).

References:
  GAE                    Schulman et al. 2016, "High-Dimensional Continuous Control Using GAE"
  KL k1/k2/k3            Schulman 2020, "Approximating KL Divergence" (http://joschu.net/blog/kl-approx.html)
  adaptive KL            Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences"
  GRPO                   Shao et al. 2024, "DeepSeekMath", sec. 4.1
  Dr.GRPO                Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective"
  RLOO                   Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization"
  REINFORCE++(-baseline) Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning LLMs"
"""

from __future__ import annotations

import torch

GROUP_EPS = 1e-4  # added to a group's std: a group whose rewards are all equal gets advantage 0


def kl_per_token(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """An estimate of KL(π || π_ref) at each sampled token, from x ~ π:
    k1 = log π/π_ref (unbiased, can be negative), k2 = ½ (log π/π_ref)², k3 = (ρ - 1) - log ρ with
    ρ = π_ref/π (unbiased and never negative)."""
    log_ratio = logp - ref_logp
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio ** 2
    if estimator == "k3":
        # clamp: exp of a large ratio overflows; beyond ±20 the estimate is meaningless anyway
        log_ratio = log_ratio.clamp(-20, 20)
        return torch.exp(-log_ratio) - 1 + log_ratio
    raise ValueError(f"unknown kl_estimator {estimator!r}")


def last_token_rewards(seq_rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, L] zeros with each row's reward on its last response token."""
    out = torch.zeros_like(mask, dtype=seq_rewards.dtype)
    last = (mask.sum(dim=1) - 1).clamp(min=0).long()
    out[torch.arange(mask.size(0), device=mask.device), last] = seq_rewards
    return out * mask


def gae(token_rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), both [B, L]:
        δ_t = r_t + γ V_{t+1} - V_t       (V after the last token is 0: the episode ends)
        A_t = δ_t + γ λ A_{t+1},  returns R_t = A_t + V_t
    """
    values = values * mask
    length = mask.size(1)
    advantages = torch.zeros_like(token_rewards)
    running = torch.zeros_like(token_rewards[:, 0])
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(running)
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def discounted_returns(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = Σ_{s≥t} γ^{s-t} r_s within each response."""
    out = torch.zeros_like(token_rewards)
    running = torch.zeros_like(token_rewards[:, 0])
    for t in reversed(range(mask.size(1))):
        running = token_rewards[:, t] + gamma * running
        out[:, t] = running
    return out * mask


def group_baseline(rewards: torch.Tensor, group_size: int, estimator: str) -> torch.Tensor:
    """Sequence rewards [B] minus their group's baseline (groups of `group_size` consecutive rows):
      grpo                  (r - mean) / (std + ε)            (std with Bessel's correction, as in TRL)
      dr_grpo               r - mean                           (no std: it biases toward easy/hard prompts)
      rloo                  r - mean of the OTHER G-1 rewards  = G/(G-1) (r - mean)
      reinforce_pp_baseline r - mean
      gae, reinforce_pp     r (unchanged)
    """
    if estimator in ("gae", "reinforce_pp"):
        return rewards
    grouped = rewards.view(-1, group_size)
    mean = grouped.mean(dim=1, keepdim=True)
    if estimator == "grpo":
        out = (grouped - mean) / (grouped.std(dim=1, keepdim=True) + GROUP_EPS)
    elif estimator in ("dr_grpo", "reinforce_pp_baseline"):
        out = grouped - mean
    elif estimator == "rloo":
        out = (grouped * group_size - grouped.sum(dim=1, keepdim=True)) / (group_size - 1)
    else:
        raise ValueError(f"unknown advantage_estimator {estimator!r}")
    return out.reshape(-1)



def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, stats=None) -> torch.Tensor:
    """(x - mean) / std over the masked entries; `stats` = (sum, sum of squares, count) to whiten over
    more than this tensor (all ranks' rollouts)."""
    total, squares, count = stats if stats is not None else ((x * mask).sum(), (x * x * mask).sum(), mask.sum())
    mean = total / count.clamp(min=1)
    var = squares / count.clamp(min=1) - mean ** 2
    out = (x - mean) * torch.rsqrt(var.clamp(min=0) + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def compute_advantages(estimator: str, seq_rewards: torch.Tensor, mask: torch.Tensor, *, group_size: int,
                       kl_penalty: torch.Tensor | None = None, values: torch.Tensor | None = None,
                       gamma: float = 1.0, lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) [B, L] before whitening.

    The sequence reward (after the group baseline) sits on the last response token; `kl_penalty`
    (-kl_coef * KL per token, when the KL goes into the reward) is added to every token. GAE then
    bootstraps from the critic's values; the critic-free estimators use the discounted return of
    each token as its advantage (for GRPO without a KL penalty: the group advantage on every token).
    """
    token_rewards = last_token_rewards(group_baseline(seq_rewards, group_size, estimator), mask)
    if kl_penalty is not None:
        token_rewards = token_rewards + kl_penalty * mask
    if estimator == "gae":
        if values is None:
            raise ValueError("gae needs the critic's values")
        return gae(token_rewards, values, mask, gamma, lam)
    returns = discounted_returns(token_rewards, mask, gamma)
    return returns, returns


class AdaptiveKLController:
    """β_{n+1} = β_n (1 + clip(KL/target - 1, ±0.2) · n_steps / horizon)  (Ziegler et al. 2019, eq. 2);
    with no target the coefficient stays fixed."""

    def __init__(self, init: float, target: float | None, horizon: int):
        self.value, self.target, self.horizon = init, target, horizon

    def update(self, kl: float, n_steps: int) -> None:
        if self.target is None:
            return
        error = max(-0.2, min(0.2, kl / self.target - 1))
        self.value *= 1 + error * n_steps / self.horizon
