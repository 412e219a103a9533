"""Advantages and losses against direct, loop-by-loop computations written from the papers' formulas."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.train.rl import advantages as adv
from posttrain.train.rl.losses import loss_units, policy_loss, tis_weights, token_weights, value_loss


def _mask(lengths, width):
    return torch.tensor([[1.0 if j < n else 0.0 for j in range(width)] for n in lengths])


def test_gae_matches_the_recursion_written_out():
    torch.manual_seed(0)
    lengths, width, gamma, lam = [5, 3, 1], 5, 0.9, 0.8
    mask = _mask(lengths, width)
    rewards, values = torch.randn(3, width) * mask, torch.randn(3, width)
    got_adv, got_ret = adv.gae(rewards, values, mask, gamma, lam)
    for b, n in enumerate(lengths):
        for t in range(n):
            # A_t = Σ_l (γλ)^l δ_{t+l},  δ_s = r_s + γ V_{s+1} - V_s, V beyond the response = 0
            want = 0.0
            for s in range(t, n):
                next_v = values[b, s + 1].item() if s + 1 < n else 0.0
                delta = rewards[b, s].item() + gamma * next_v - values[b, s].item()
                want += (gamma * lam) ** (s - t) * delta
            assert got_adv[b, t].item() == pytest.approx(want, abs=1e-5)
            assert got_ret[b, t].item() == pytest.approx(want + values[b, t].item(), abs=1e-5)
        assert torch.all(got_adv[b, n:] == 0)


def test_group_baselines_match_their_definitions():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 5.0])  # two groups of 4
    g = 4
    grpo = adv.group_baseline(r, g, "grpo")
    dr = adv.group_baseline(r, g, "dr_grpo")
    rloo = adv.group_baseline(r, g, "rloo")
    for k in range(2):
        grp = r[k * g:(k + 1) * g].tolist()
        mean = sum(grp) / g
        std = math.sqrt(sum((x - mean) ** 2 for x in grp) / (g - 1))
        for i, x in enumerate(grp):
            others = (sum(grp) - x) / (g - 1)
            assert grpo[k * g + i].item() == pytest.approx((x - mean) / (std + adv.GROUP_EPS), abs=1e-5)
            assert dr[k * g + i].item() == pytest.approx(x - mean, abs=1e-6)
            assert rloo[k * g + i].item() == pytest.approx(x - others, abs=1e-6)
    same = adv.group_baseline(torch.ones(4), 4, "grpo")
    assert torch.all(same == 0)  # nothing to learn from a group that scored alike


def test_reinforce_pp_returns_include_the_kl_penalty_and_are_whitened():
    torch.manual_seed(1)
    lengths, width, gamma = [4, 2, 3, 4], 4, 1.0
    mask = _mask(lengths, width)
    seq = torch.tensor([1.0, 0.0, 0.5, 2.0])
    penalty = -0.1 * torch.rand(4, width)
    a, _ = adv.compute_advantages("reinforce_pp_baseline", seq, mask, group_size=2, kl_penalty=penalty, gamma=gamma)
    base = adv.group_baseline(seq, 2, "reinforce_pp_baseline")
    for b, n in enumerate(lengths):
        for t in range(n):
            want = sum(penalty[b, s].item() for s in range(t, n)) + base[b].item()
            assert a[b, t].item() == pytest.approx(want, abs=1e-6)
    white = adv.masked_whiten(a, mask)
    values = white[mask.bool()]
    assert values.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert values.var(unbiased=False).item() == pytest.approx(1.0, abs=1e-3)


def test_grpo_without_kl_puts_the_group_advantage_on_every_token():
    mask = _mask([3, 1, 2, 2], 3)
    a, _ = adv.compute_advantages("grpo", torch.tensor([1.0, 0.0, 1.0, 1.0]), mask, group_size=2)
    z = adv.group_baseline(torch.tensor([1.0, 0.0, 1.0, 1.0]), 2, "grpo")
    assert torch.allclose(a, z[:, None] * mask)


def test_kl_estimators():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    r = logp - ref
    assert torch.allclose(adv.kl_per_token(logp, ref, "k1"), r)
    assert torch.allclose(adv.kl_per_token(logp, ref, "k2"), 0.5 * r ** 2)
    assert torch.allclose(adv.kl_per_token(logp, ref, "k3"), torch.exp(-r) - 1 + r)
    assert torch.all(adv.kl_per_token(logp, ref, "k3") >= 0)


def test_adaptive_kl_moves_toward_the_target():
    ctl = adv.AdaptiveKLController(0.1, target=0.05, horizon=100)
    ctl.update(kl=0.5, n_steps=10)  # far above target: error clipped to +0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    ctl.update(kl=0.0, n_steps=10)
    assert ctl.value < 0.1 * 1.02
    fixed = adv.AdaptiveKLController(0.1, target=None, horizon=100)
    fixed.update(kl=1.0, n_steps=10)
    assert fixed.value == 0.1


def test_clipped_policy_loss_and_dual_clip():
    old = torch.zeros(4)
    logp = torch.log(torch.tensor([1.5, 0.5, 1.5, 10.0]))
    a = torch.tensor([1.0, 1.0, -1.0, -1.0])
    loss, clipped = policy_loss(logp, old, a, 0.2)
    # ratio 1.5, A>0: min(1.5, 1.2) -> 1.2; ratio 0.5, A>0: min(0.5, 0.8) -> 0.5 (not clipped);
    # ratio 1.5, A<0: min(-1.5, -1.2) -> -1.5; ratio 10, A<0: -10
    assert torch.allclose(loss, torch.tensor([-1.2, -0.5, 1.5, 10.0]))
    assert clipped.tolist() == [1.0, 0.0, 0.0, 0.0]
    dual, _ = policy_loss(logp, old, a, 0.2, dual_clip=3.0)
    assert torch.allclose(dual, torch.tensor([-1.2, -0.5, 1.5, 3.0]))  # the huge ratio is bounded by c|A|


def test_truncated_importance_weights():
    old = torch.log(torch.tensor([0.5, 0.5, 0.9, 0.2]))  # the trainer's probabilities of the sampled tokens
    sampler = torch.log(torch.tensor([0.5, 0.25, 0.1, 0.4]))  # the rollout engine's, for the same tokens
    w = tis_weights(old.requires_grad_(), sampler, cap=2.0)
    # ratios 1, 2, 9 (capped at 2), 0.5; no gradient flows through the weight
    assert torch.allclose(w, torch.tensor([1.0, 2.0, 2.0, 0.5])) and not w.requires_grad


def test_clipped_value_loss():
    v, old, ret = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]), torch.tensor([1.0, 0.5])
    loss, _ = value_loss(v, old, ret, 0.2)
    # row 0: unclipped error 0, clipped value 0.2 -> error 0.64: the larger is kept
    assert torch.allclose(loss, torch.tensor([0.5 * 0.64, 0.5 * 0.25]))


def test_loss_aggregation_weights():
    mask = _mask([4, 2], 4)
    w = token_weights(mask, "token_mean", 8)
    assert loss_units([4, 2], "token_mean") == 6 and torch.equal(w, mask)
    w = token_weights(mask, "seq_mean_token_mean", 8)
    assert loss_units([4, 2], "seq_mean_token_mean") == 2 and w[0, 0].item() == 0.25 and w[1, 0].item() == 0.5
    w = token_weights(mask, "seq_mean_token_sum_norm", 8)
    assert loss_units([4, 2], "seq_mean_token_sum_norm") == 2 and w[1, 0].item() == 1 / 8 and w[1, 3].item() == 0
    # the units over a mini-batch times the weighted mean is the weighted sum, whatever the mode
    for mode in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"):
        assert torch.isclose(token_weights(mask, mode, 8).sum(),
                             torch.tensor(float({"token_mean": 6, "seq_mean_token_mean": 2,
                                                 "seq_mean_token_sum_norm": 6 / 8}[mode])))
    with pytest.raises(ValueError, match="loss_agg_mode"):
        loss_units([1], "sum")
