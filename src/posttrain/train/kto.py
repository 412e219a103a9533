"""`posttrain kto`: KTO on unpaired rows (a prompt, a response, and whether the response is good).

The loss first, then the objective that runs it, then the stage read top to bottom: checks ->
tokenizer -> rows -> the model with its finetuning type -> the reference's log-probs -> the
objective -> the Trainer -> the save.

KTO — Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", eq. 8.
With r(x, y) = log π(y|x) - log π_ref(y|x) and z0 a batch estimate of KL(π || π_ref),

    desirable y:    L = λ_D (1 - σ(β (r(x, y) - z0)))
    undesirable y:  L = λ_U (1 - σ(β (z0 - r(x, y))))

    z0 = max(0, mean over the batch of r(x, y')), y' another row's response to x (no gradient)

β = `pref_beta`, λ_D = `kto_chosen_weight`, λ_U = `kto_rejected_weight`. Each row's mismatched
y' is fixed when the data is read (data/pairs.py), so its reference log-prob is computed once with
the others.

z0 is one number per optimizer step: the mean over EVERY row of the step — all its micro-batches, on
all ranks (summed with an all-reduce, as TRL gathers it) — so accumulating 4x2 or running 2
processes gives the same z0, and the same update, as one batch of 8. The loop calls `begin_step`
with the step's micro-batches before any gradient pass; it runs the mismatched rows once without
gradient (the paper detaches z0), and `forward` then runs only the rows being trained. Evaluation
does the same over the whole eval set.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from posttrain.config import KTOConfig
from posttrain.data.pairs import collate_unpaired, count_rows
from posttrain.data.stage_samples import load_unpaired_samples
from posttrain.train import distributed as dist, stage_steps
from posttrain.train.logps import fill_reference, sequence_logps
from posttrain.train.loop import TrainResult

log = logging.getLogger(__name__)


def kto_loss(logratios: torch.Tensor, labels: torch.Tensor, kl: torch.Tensor | float, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> torch.Tensor:
    """Per row: λ_D (1 - σ(β (r - z0))) where labels is True, λ_U (1 - σ(β (z0 - r))) where False."""
    desirable = desirable_weight * (1 - torch.sigmoid(beta * (logratios - kl)))
    undesirable = undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratios)))
    return torch.where(labels, desirable, undesirable)


def kl_estimate(logratio_sum: float, rows: int) -> torch.Tensor:
    """z0 = max(0, mean r(x, y')) from the sum of r(x, y') over `rows` rows (0 when there are none)."""
    return torch.tensor(logratio_sum / rows if rows else 0.0).clamp(min=0)


def _rows(batch: dict, start: int, stop: int | None = None) -> dict:
    """Rows start:stop of a collated batch, cut to their own longest sequence (less padding)."""
    part = {k: batch[k][start:stop] for k in ("input_ids", "attention_mask", "targets")}
    width = int(part["attention_mask"].sum(dim=1).max())
    return {k: v[:, :width] for k, v in part.items()}


class KTOObjective(nn.Module):
    """`begin_step`: z0 from the mismatched rows of the whole step; `forward`: the KTO loss of one
    micro-batch's rows (collated as B rows, then their B mismatched twins)."""

    def __init__(self, model: nn.Module, config: KTOConfig):
        super().__init__()
        self.model = model
        self.beta, self.ftx = config.pref_beta, config.pref_ftx
        self.weights = (config.kto_chosen_weight, config.kto_rejected_weight)
        self.kl: torch.Tensor | None = None  # z0 of the current step (or eval pass), set by begin_step

    @torch.no_grad()
    def begin_step(self, batches) -> None:
        """z0 over every row of `batches` (this rank's micro-batches of one step) and of every rank.
        Every rank must call it, even with no batch (a rank with no rows left adds nothing)."""
        total = torch.zeros(2, dtype=torch.float64)
        for batch in batches:
            b = batch["label"].size(0)
            logps, _ = sequence_logps(self.model, _rows(batch, b))
            total += torch.tensor([(logps.float() - batch["ref_mismatched"]).sum().item(), b], dtype=torch.float64)
        total = dist.all_reduce_sum(total)
        self.kl = kl_estimate(total[0].item(), int(total[1].item()))

    def forward(self, batch: dict) -> dict:
        if self.kl is None:
            raise RuntimeError("KTOObjective.begin_step must run before forward: it sets the KL reference point z0")
        b = batch["label"].size(0)
        logps, counts = sequence_logps(self.model, _rows(batch, 0, b))
        labels = batch["label"]
        logratios = logps - batch["ref"]
        kl = self.kl.to(logratios.device)
        loss = kto_loss(logratios, labels, kl, self.beta, *self.weights)
        if self.ftx:  # an NLL term on the desirable responses, as RPO does for DPO
            loss = loss + self.ftx * torch.where(labels, -logps / counts.clamp(min=1), 0.0)
        rewards = self.beta * logratios.detach()
        good, bad = labels.sum().item(), (~labels).sum().item()
        # Every name on every batch, even with a count of 0: under DDP each rank must reduce the same names.
        metrics = {"kl": (kl * b, b),
                   "rewards/chosen": (rewards[labels].sum(), good),
                   "logps/chosen": (logps[labels].detach().sum(), good),
                   "rewards/rejected": (rewards[~labels].sum(), bad),
                   "logps/rejected": (logps[~labels].detach().sum(), bad)}
        return {"loss_sum": loss.sum(), "metrics": metrics}


def run_kto(config: KTOConfig) -> TrainResult:
    """Unpaired rows in, the policy trained against its frozen reference, the result in output_dir."""
    # Device, process group and seed; every check that needs nothing loaded.
    device = stage_steps.start_run(config)
    tokenizer = stage_steps.load_stage_tokenizer(config)
    train, evals = load_unpaired_samples(config, tokenizer, main=dist.is_main())
    model, summary = stage_steps.apply_finetuning_type(config, stage_steps.load_trainable_model(config, device))
    pad_id = tokenizer.pad_token_id
    # The reference's log-probs of every row and its mismatched twin, once, before the first step
    # (train/logps.py): no reference model stays in memory while training.
    fill_reference(config, model, train, evals, pad_id, device)
    log.info("kto: %d training rows, %d eval rows -> %s", len(train), len(evals), config.output_dir)
    objective = KTOObjective(model, config)
    return stage_steps.train_and_save(config, model, tokenizer, objective, train, evals,
                                      collate=lambda samples: collate_unpaired(samples, pad_id), count=count_rows,
                                      device=device, summary=summary)
