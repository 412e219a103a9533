"""The RL update as objectives of the loop's form (train/loop.py): an `nn.Module` whose forward takes
one micro-batch of rollouts and returns the SUM of its loss plus `metrics` {name: (sum, count)}.

The forward runs the model inside it (body and head, or the whole model), so a wrapper around the
objective (DDP: `loop.distribute`) sees every trained parameter and syncs their gradients itself.

A micro-batch is a dict: `batch` (collate_rollouts), `per` (Experience.rows: old/ref log-probs,
values, advantages, returns of these rows), `count` (its response tokens), and the mini-batch's
totals over every micro-batch and rank: `units` (what the policy loss is a mean over, `loss_units`)
and `tokens`; `measure_kl` asks the policy objective for the KL (it was not measured before the update).
The caller divides the policy's loss sum by `units` and the value's by `tokens`.
"""

from __future__ import annotations

from torch import nn

from posttrain.train.rl import advantages as adv
from posttrain.train.rl.experience import response_logps, response_values
from posttrain.train.rl.losses import policy_loss, tis_weights, token_weights, value_loss


class PolicyObjective(nn.Module):
    """The actor's clipped surrogate loss (losses.py), weighted per `loss_agg_mode`, plus the KL loss
    (use_kl_loss) at the controller's current coefficient and minus the entropy bonus."""

    def __init__(self, actor: nn.Module, config, kl: adv.AdaptiveKLController):
        super().__init__()
        self.actor = actor
        self.config = config
        self.kl = kl

    def forward(self, micro: dict) -> dict:
        c, batch, per = self.config, micro["batch"], micro["per"]
        mask, count = batch["mask"], micro["count"]
        logp, entropy = response_logps(self.actor, batch, c.temperature, entropy=True)
        old = per["old_logp"] if "old_logp" in per else logp.detach()
        weights = token_weights(mask, c.loss_agg_mode, c.max_completion_length)
        loss, clipped = policy_loss(logp, old, per["advantages"], c.cliprange, c.cliprange_high, c.dual_clip)
        metrics = {}
        if "sampler_logp" in per:  # the sampler and the trainer disagree on the tokens' log-probs
            metrics["logp_gap"] = (((old - per["sampler_logp"]).abs() * mask).sum(), count)
            if c.tis_cap is not None:
                tis = tis_weights(old, per["sampler_logp"], c.tis_cap)
                loss = loss * tis
                metrics["tis_weight"] = ((tis * mask).sum(), count)
        metrics.update({"policy_loss": ((loss.detach() * weights).sum(), micro["units"]),
                        "clip_fraction": ((clipped * mask).sum(), count),
                        "entropy": ((entropy.detach() * mask).sum(), count),
                        "approx_kl": ((0.5 * (logp.detach() - old) ** 2 * mask).sum(), count)})
        if c.use_kl_loss and "ref_logp" in per:
            kl = adv.kl_per_token(logp, per["ref_logp"], c.kl_estimator)
            loss = loss + self.kl.value * kl
            if micro["measure_kl"]:
                metrics["kl"] = ((kl.detach() * mask).sum(), count)
        if c.entropy_coef:
            loss = loss - c.entropy_coef * entropy
        return {"loss_sum": (loss * weights).sum(), "metrics": metrics}


class ValueObjective(nn.Module):
    """The critic's clipped value loss (losses.py), a mean over response tokens."""

    def __init__(self, critic: nn.Module, cliprange_value: float):
        super().__init__()
        self.critic = critic
        self.cliprange_value = cliprange_value

    def forward(self, micro: dict) -> dict:
        batch, per = micro["batch"], micro["per"]
        mask = batch["mask"]
        values = response_values(self.critic, batch)
        loss, clipped = value_loss(values, per["old_values"], per["returns"], self.cliprange_value)
        return {"loss_sum": (loss * mask).sum(),
                "metrics": {"value_loss": ((loss.detach() * mask).sum(), micro["tokens"]),
                            "value_clip_fraction": ((clipped * mask).sum(), micro["count"])}}
