"""`posttrain kto`: KTO on unpaired rows (a prompt, a response, and whether the response is good).

KTO — Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", eq. 8.
With r(x, y) = log π(y|x) - log π_ref(y|x) and z0 a batch estimate of KL(π || π_ref),

    desirable y:    L = λ_D (1 - σ(β (r(x, y) - z0)))
    undesirable y:  L = λ_U (1 - σ(β (z0 - r(x, y))))

    z0 = max(0, mean over the batch of r(x, y')), y' another row's response to x (no gradient)

β = `pref_beta`, λ_D = `kto_chosen_weight`, λ_U = `kto_rejected_weight`. Each row's mismatched
y' is fixed when the data is read (data/pairs.py), so its reference log-prob is computed once with
the others; the model sees each row and its mismatched twin in one forward pass. z0 is estimated
per micro-batch (under DDP: per rank), a slightly noisier estimate than an all-gathered one.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from posttrain.config import KTOConfig
from posttrain.data.pairs import collate_unpaired
from posttrain.model.adapters import save_pissa_initial
from posttrain.model.loading import load_tokenizer
from posttrain.train import distributed as dist, stage
from posttrain.train.logps import sequence_logps
from posttrain.train.loop import Trainer, TrainResult
from posttrain.train.preference import fill_reference

log = logging.getLogger(__name__)


def kto_loss(logratios: torch.Tensor, labels: torch.Tensor, kl: torch.Tensor | float, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> torch.Tensor:
    """Per row: λ_D (1 - σ(β (r - z0))) where labels is True, λ_U (1 - σ(β (z0 - r))) where False."""
    desirable = desirable_weight * (1 - torch.sigmoid(beta * (logratios - kl)))
    undesirable = undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratios)))
    return torch.where(labels, desirable, undesirable)


def kl_estimate(mismatched_logratios: torch.Tensor) -> torch.Tensor:
    """z0 = max(0, mean r(x, y')), detached: KTO uses it as a reference point, not a training signal."""
    return mismatched_logratios.detach().mean().clamp(min=0)


class KTOObjective(nn.Module):
    """Each row and its mismatched twin in one forward pass (2B rows), then the KTO loss."""

    def __init__(self, model: nn.Module, config: KTOConfig):
        super().__init__()
        self.model = model
        self.beta, self.ftx = config.pref_beta, config.pref_ftx
        self.weights = (config.kto_chosen_weight, config.kto_rejected_weight)

    def forward(self, batch: dict) -> dict:
        logps, counts = sequence_logps(self.model, batch)
        b = batch["label"].size(0)
        labels = batch["label"]
        logratios = logps[:b] - batch["ref"]
        kl = kl_estimate(logps[b:] - batch["ref_mismatched"])
        loss = kto_loss(logratios, labels, kl, self.beta, *self.weights)
        if self.ftx:  # an NLL term on the desirable responses, as RPO does for DPO
            loss = loss + self.ftx * torch.where(labels, -logps[:b] / counts[:b].clamp(min=1), 0.0)
        rewards = self.beta * logratios.detach()
        good, bad = labels.sum().item(), (~labels).sum().item()
        metrics = {"kl": (kl * b, b)}
        if good:
            metrics.update({"rewards/chosen": (rewards[labels].sum(), good), "logps/chosen": (logps[:b][labels].detach().sum(), good)})
        if bad:
            metrics.update({"rewards/rejected": (rewards[~labels].sum(), bad),
                            "logps/rejected": (logps[:b][~labels].detach().sum(), bad)})
        return {"loss_sum": loss.sum(), "metrics": metrics}


def count_rows(batch: dict) -> int:
    return int(batch["num_rows"])


def run_kto(config: KTOConfig) -> TrainResult:
    device = stage.begin(config)
    tokenizer = load_tokenizer(config.model_name_or_path, config.trust_remote_code)
    train, evals = stage.load_unpaired_samples(config, tokenizer)
    model = stage.load_trainable_model(config, device)
    model, summary = stage.adapt(config, model)
    fill_reference(config, model, train, evals, tokenizer.pad_token_id, device)
    stage.open_output_dir(config)
    pissa_initial = save_pissa_initial(model) if dist.is_main() else None

    def save_final(folder: Path) -> None:
        stage.save_model(model, tokenizer, config, folder, pissa_initial)

    trainer = Trainer(config, KTOObjective(model, config), train_examples=train, eval_examples=evals,
                      collate=lambda s: collate_unpaired(s, tokenizer.pad_token_id), count=count_rows,
                      save_final=save_final, device=device, run_config=config.model_dump(mode="json"),
                      summary=summary)
    return trainer.train()
