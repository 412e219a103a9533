"""`posttrain dpo`: the DPO family, SimPO and ORPO on preference pairs.

The losses first, then the objective that runs them, then the stage read top to bottom: checks ->
tokenizer -> pairs -> the model with its finetuning type -> the reference's log-probs -> the
objective -> the Trainer -> the save.

Notation, per pair: x the prompt, y_w the chosen and y_l the rejected response; log π(y|x) the
policy's summed log-probability of a response's tokens, log π_ref(y|x) the reference's; |y| the
response's token count; σ the logistic function; β = `pref_beta`.

    h = [log π(y_w|x) - log π_ref(y_w|x)] - [log π(y_l|x) - log π_ref(y_l|x)]

The implicit reward of a response (logged as rewards/chosen, rewards/rejected) is
β [log π(y|x) - log π_ref(y|x)], or β log π(y|x) / |y| for the reference-free SimPO and ORPO.
Each loss function returns one loss per pair; the stage sums them (the loop divides by the pairs
in the optimizer step).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from posttrain.config import DPOConfig
from posttrain.data.pairs import collate_pairs, count_pairs
from posttrain.data.stage_samples import load_pair_samples
from posttrain.train import distributed as dist, stage_steps
from posttrain.train.logps import fill_reference, sequence_logps
from posttrain.train.loop import TrainResult

log = logging.getLogger(__name__)


# ---- the losses ---------------------------------------------------------------------------------

def sigmoid_loss(h: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO — Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly
    a Reward Model":  L = -log σ(β h).

    With label smoothing ε > 0 it is conservative DPO (cDPO; Mitchell 2023, "A note on DPO with
    noisy preferences & relationship to IPO"), which assumes each label is flipped with probability ε:
        L = -(1 - ε) log σ(β h) - ε log σ(-β h)
    """
    return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)


def robust_loss(h: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """Robust DPO — Chowdhury et al. 2024, "Provably Robust DPO: Aligning Language Models with Noisy
    Feedback": an unbiased estimate of the clean-label loss when labels flip with probability ε:
        L = [(1 - ε)(-log σ(β h)) - ε(-log σ(-β h))] / (1 - 2ε)
    """
    eps = label_smoothing
    return (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)


def ipo_loss(h_per_token: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO — Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences", eq. 17 (τ = β):  L = (h - 1 / (2β))².

    The log-ratios in h are averaged per token (each response's sum divided by |y|): summed over a
    response the squared loss grows with length. This is TRL's choice, confirmed with the authors.
    """
    return (h_per_token - 1 / (2 * beta)) ** 2


def hinge_loss(h: torch.Tensor, beta: float) -> torch.Tensor:
    """SLiC-HF — Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback",
    the rank-calibration hinge with the reference as anchor:  L = max(0, 1 - β h).
    """
    return torch.relu(1 - beta * h)


def bco_pair_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, delta: torch.Tensor | float
                  ) -> torch.Tensor:
    """BCO — Jung et al. 2024, "Binary Classifier Optimization for Large Language Model Alignment",
    on pairs: a binary classifier with the implicit reward r = β [log π(y|x) - log π_ref(y|x)] as
    its logit, chosen labelled 1 and rejected 0, shifted by δ, the running mean of the rewards:
        L = -log σ(r_w - δ) - log σ(-(r_l - δ))
    """
    return -F.logsigmoid(chosen_rewards - delta) - F.logsigmoid(-(rejected_rewards - delta))


def simpo_loss(chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor, beta: float, gamma: float
               ) -> torch.Tensor:
    """SimPO — Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free
    Reward": no reference, the reward is the length-normalized log-probability, with a target margin γ:
        L = -log σ(β/|y_w| log π(y_w|x) - β/|y_l| log π(y_l|x) - γ)
    """
    return -F.logsigmoid(beta * chosen_avg_logps - beta * rejected_avg_logps - gamma)


def orpo_loss(chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor, lam: float) -> torch.Tensor:
    """ORPO — Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model":
    the SFT loss on chosen plus λ times an odds-ratio penalty, with P(y|x) = exp(log π(y|x) / |y|)
    and odds(y|x) = P / (1 - P):
        L = -log π(y_w|x) / |y_w|  -  λ log σ(log odds(y_w|x) - log odds(y_l|x))
    """
    def log_odds(avg_logps):  # log(P / (1 - P)), stable for P near 1
        return avg_logps - torch.log1p(-torch.exp(avg_logps).clamp(max=1 - 1e-6))

    return -chosen_avg_logps - lam * F.logsigmoid(log_odds(chosen_avg_logps) - log_odds(rejected_avg_logps))


REFERENCE_FREE = ("simpo", "orpo")


def preference_loss(kind: str, logps: tuple[torch.Tensor, torch.Tensor], lengths: tuple[torch.Tensor, torch.Tensor],
                    ref: tuple[torch.Tensor, torch.Tensor] | None, *, beta: float, label_smoothing: float = 0.0,
                    simpo_gamma: float = 0.5, bco_delta: torch.Tensor | float = 0.0
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss per pair, chosen rewards, rejected rewards) for `pref_loss` = kind.

    logps: summed policy log-probs (chosen, rejected); lengths: response token counts; ref: the
    reference's summed log-probs (None for SimPO / ORPO).
    """
    (chosen, rejected), (n_w, n_l) = logps, (lengths[0].clamp(min=1), lengths[1].clamp(min=1))
    if kind in REFERENCE_FREE:
        avg_w, avg_l = chosen / n_w, rejected / n_l
        loss = simpo_loss(avg_w, avg_l, beta, simpo_gamma) if kind == "simpo" else orpo_loss(avg_w, avg_l, beta)
        return loss, beta * avg_w.detach(), beta * avg_l.detach()
    ratio_w, ratio_l = chosen - ref[0], rejected - ref[1]
    rewards_w, rewards_l = beta * ratio_w, beta * ratio_l
    h = ratio_w - ratio_l
    if kind == "sigmoid":
        loss = sigmoid_loss(h, beta, label_smoothing)
    elif kind == "robust":
        loss = robust_loss(h, beta, label_smoothing)
    elif kind == "ipo":
        loss = ipo_loss(ratio_w / n_w - ratio_l / n_l, beta)
    elif kind == "hinge":
        loss = hinge_loss(h, beta)
    elif kind == "bco_pair":
        loss = bco_pair_loss(rewards_w, rewards_l, bco_delta)
    else:
        raise ValueError(f"unknown pref_loss {kind!r}")
    return loss, rewards_w.detach(), rewards_l.detach()


# ---- the objective ------------------------------------------------------------------------------

class PreferenceObjective(nn.Module):
    """Chosen and rejected through the model in ONE forward pass (2B rows), then `pref_loss`, plus
    the RPO term: `pref_ftx` times the per-token NLL of the chosen response."""

    def __init__(self, model: nn.Module, config: DPOConfig):
        super().__init__()
        self.model = model
        self.kind, self.beta, self.ftx = config.pref_loss, config.pref_beta, config.pref_ftx
        self.label_smoothing, self.gamma = config.dpo_label_smoothing, config.simpo_gamma
        # BCO's δ: the mean reward over every EARLIER optimizer step, on every rank (TRL also counts
        # the current batch; leaving the current step out makes δ, and so the update, the same however
        # the step is split into micro-batches and processes). Not a parameter, not trained; persistent,
        # so checkpoints keep it and a resumed run goes on with the same δ.
        self.register_buffer("bco_reward_sum", torch.zeros((), dtype=torch.float64))
        self.register_buffer("bco_reward_count", torch.zeros((), dtype=torch.float64))
        self._bco_step = torch.zeros(2, dtype=torch.float64)  # this rank's reward sum and count in this step

    def end_step(self) -> None:
        """After every micro-batch of a step, on every rank: the step's rewards, summed over the ranks
        (TRL gathers them too), join the running mean."""
        if self.kind != "bco_pair":
            return
        total = dist.all_reduce_sum(self._bco_step.clone())
        self.bco_reward_sum += total[0].to(self.bco_reward_sum.device)
        self.bco_reward_count += total[1].to(self.bco_reward_count.device)
        self._bco_step.zero_()

    def forward(self, batch: dict) -> dict:
        logps, counts = sequence_logps(self.model, batch)
        b = batch["margin"].size(0)
        chosen, rejected = logps[:b], logps[b:]
        n_w, n_l = counts[:b], counts[b:]
        ref = None if self.kind in REFERENCE_FREE else (batch["ref_chosen"], batch["ref_rejected"])
        delta = 0.0
        if self.kind == "bco_pair":
            if self.training and not batch.get("filler"):
                rewards = self.beta * torch.cat([chosen - ref[0], rejected - ref[1]]).detach()
                self._bco_step += torch.tensor([rewards.sum().item(), rewards.numel()], dtype=torch.float64)
            delta = (self.bco_reward_sum / self.bco_reward_count.clamp(min=1)).float()
        loss, rewards_w, rewards_l = preference_loss(
            self.kind, (chosen, rejected), (n_w, n_l), ref, beta=self.beta, label_smoothing=self.label_smoothing,
            simpo_gamma=self.gamma, bco_delta=delta)
        if self.ftx:
            loss = loss + self.ftx * (-chosen / n_w.clamp(min=1))
        d = lambda t: t.detach().sum()  # noqa: E731
        return {"loss_sum": loss.sum(), "metrics": {
            "rewards/chosen": (d(rewards_w), b), "rewards/rejected": (d(rewards_l), b),
            "rewards/accuracy": (d((rewards_w > rewards_l).float()), b), "rewards/margin": (d(rewards_w - rewards_l), b),
            "logps/chosen": (d(chosen), b), "logps/rejected": (d(rejected), b)}}


# ---- the stage ----------------------------------------------------------------------------------

def run_dpo(config: DPOConfig) -> TrainResult:
    """Preference pairs in, the policy trained against its frozen reference, the result in output_dir."""
    # Device, process group and seed; every check that needs nothing loaded.
    device = stage_steps.start_run(config)
    tokenizer = stage_steps.load_stage_tokenizer(config)
    train, evals = load_pair_samples(config, tokenizer, main=dist.is_main())
    model, summary = stage_steps.apply_finetuning_type(config, stage_steps.load_trainable_model(config, device))
    pad_id = tokenizer.pad_token_id
    # The reference's log-probs of every response, once, before the first step (train/logps.py): no reference
    # model stays in memory while training. SimPO and ORPO have no reference.
    if config.pref_loss not in REFERENCE_FREE:
        fill_reference(config, model, train, evals, pad_id, device)
    log.info("%s: %d training pairs, %d eval pairs -> %s", config.pref_loss, len(train), len(evals), config.output_dir)
    objective = PreferenceObjective(model, config)
    return stage_steps.train_and_save(config, model, tokenizer, objective, train, evals,
                                      collate=lambda samples: collate_pairs(samples, pad_id), count=count_pairs,
                                      device=device, summary=summary)
