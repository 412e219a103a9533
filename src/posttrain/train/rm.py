"""`posttrain rm`: train a reward model on preference pairs; read top to bottom.

setup (config -> tokenizer -> pairs -> model with a scalar head) -> Trainer -> reward statistics
-> save. The model is a causal LM with a scalar head read at each sequence's last real token
(model/reward.py); the loss is Bradley-Terry:

    L = -log σ(r(x, y_w) - r(x, y_l) - m)

(Ouyang et al. 2022, "Training language models to follow instructions with human feedback",
eq. 1), where m is the pair's `margin` column (0 when absent; the margin form is Llama 2's,
Touvron et al. 2023). `center_rewards_coefficient` c adds c (r_w + r_l)² (Eisenstein et al.
2023), which keeps rewards centred on zero. `lm_coefficient` λ adds λ times the per-token NLL of the
chosen response, read through the starting model's LM head from the same forward pass (the SFT
regularizer of Yang et al. 2024, "Regularizing Hidden States Enables Learning Generalizable Reward
Model for LLMs"): every token of the chosen response then trains the body, not only the last one,
which keeps its hidden states knowing what the right response is. Eval reports pair accuracy and
mean margin.
"""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from posttrain.config import RMConfig, save_config
from posttrain.data.batching import collate
from posttrain.data.chat import IGNORE_INDEX
from posttrain.data.pairs import collate_pairs, count_pairs
from posttrain.data.stage_samples import load_pair_samples
from posttrain.data.templates import carry_template
from posttrain.errors import ConfigError
from posttrain.model.adapters import apply_finetuning
from posttrain.model.reward import (
    language_model_head, last_hidden_states, load_reward_model, reward_head, rewards_from_hidden, sequence_rewards,
    set_reward_stats)
from posttrain.train import distributed as dist, stage_steps
from posttrain.train.loop import Trainer, TrainResult, autocast
from posttrain.train.parallel import deepspeed_zero_stage

log = logging.getLogger(__name__)


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | float = 0.0
                       ) -> torch.Tensor:
    """-log σ(r_w - r_l - m), per pair."""
    return -F.logsigmoid(chosen - rejected - margin)


class PairwiseRewardObjective(nn.Module):
    """Both responses of every pair scored in ONE forward pass (2B rows), then Bradley-Terry; with an
    `lm_head`, `lm_coefficient` times the per-token NLL of each chosen response from the same pass."""

    def __init__(self, model: nn.Module, center_rewards_coefficient: float = 0.0, lm_coefficient: float = 0.0,
                 lm_head: nn.Module | None = None):
        super().__init__()
        if lm_coefficient and lm_head is None:
            raise ValueError("lm_coefficient needs the model's lm_head")
        self.model = model
        self.center = center_rewards_coefficient
        self.lm_coefficient = lm_coefficient
        self.lm_head = lm_head if lm_coefficient else None

    def forward(self, batch: dict) -> dict:
        hidden = last_hidden_states(self.model, batch["input_ids"], batch["attention_mask"])
        rewards = rewards_from_hidden(self.model, hidden, batch["attention_mask"])
        b = batch["margin"].size(0)
        chosen, rejected = rewards[:b], rewards[b:]
        loss = bradley_terry_loss(chosen, rejected, batch["margin"])
        if self.center:
            loss = loss + self.center * (chosen + rejected) ** 2
        d = lambda t: t.detach().sum()  # noqa: E731
        metrics = {"accuracy": (d((chosen > rejected).float()), b), "margin": (d(chosen - rejected), b),
                   "rewards/chosen": (d(chosen), b), "rewards/rejected": (d(rejected), b)}
        if self.lm_head is not None:
            nll = chosen_nll(self.lm_head, hidden[:b], batch["targets"][:b])
            loss = loss + self.lm_coefficient * nll
            metrics["nll/chosen"] = (d(nll), b)
        return {"loss_sum": loss.sum(), "metrics": metrics}


def chosen_nll(lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token NLL of each row's trained tokens (targets already shifted), [rows]."""
    selected = targets != IGNORE_INDEX
    token_nll = F.cross_entropy(lm_head(hidden[selected]).float(), targets[selected], reduction="none")
    sums = torch.zeros(targets.size(0), dtype=token_nll.dtype, device=targets.device)
    sums = sums.index_add(0, selected.nonzero()[:, 0], token_nll)
    return sums / selected.sum(dim=1).clamp(min=1)


@torch.no_grad()
def score_sequences(model: nn.Module, sequences: list, *, pad_id: int, device: torch.device, batch_size: int,
                    precision=contextlib.nullcontext) -> torch.Tensor:
    """The reward of each tokenized sequence (eval mode, batched by length)."""
    was_training = model.training
    model.eval()
    out = torch.zeros(len(sequences))
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i].input_ids))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = collate([sequences[i] for i in idx], pad_id)
        with precision():
            out[idx] = sequence_rewards(model, batch["input_ids"].to(device),
                                        batch["attention_mask"].to(device)).float().cpu()
    model.train(was_training)
    return out


RM_FINETUNING = ("full", "freeze", "lora")


def _whole_reward_model(config: RMConfig, device: torch.device, pad_id: int, state_dict: dict) -> nn.Module:
    """A reward model with `finetuning_type` applied and the trained weights (gathered from shards) loaded."""
    model = load_reward_model(config.model_name_or_path, device=device, trust_remote_code=config.trust_remote_code,
                              attn_implementation=config.attn_implementation, pad_token_id=pad_id)
    model = apply_finetuning(model, config, task_type="SEQ_CLS")
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if unexpected or [k for k in missing if "lora_" in k or k.endswith("score.weight")]:
        raise RuntimeError(f"the gathered reward model does not fit its layout (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]})")
    return model


def run_rm(config: RMConfig) -> TrainResult:
    if config.finetuning_type not in RM_FINETUNING:
        raise ConfigError(f"finetuning_type {config.finetuning_type!r} is not available for rm; use one of "
                          f"{', '.join(RM_FINETUNING)} (a LoRA adapter is merged into the saved reward model)")
    device = stage_steps.start_run(config)
    if deepspeed_zero_stage(config) == 3:
        raise ConfigError("rm: DeepSpeed ZeRO-3 is not available for reward models yet (the saved model is merged "
                          "and scored whole); use fsdp: full_shard, or ZeRO stage 1 or 2")
    tokenizer = stage_steps.load_stage_tokenizer(config)
    train, evals = load_pair_samples(config, tokenizer, main=dist.is_main())
    model = stage_steps.load_low_memory(config, lambda on_meta: load_reward_model(
        config.model_name_or_path, device=device, trust_remote_code=config.trust_remote_code,
        attn_implementation=config.attn_implementation, gradient_checkpointing=config.gradient_checkpointing,
        pad_token_id=tokenizer.pad_token_id, on_meta=on_meta))
    # SEQ_CLS: PEFT trains and saves the new `score` head beside the adapter.
    model, summary = stage_steps.apply_finetuning_type(config, model, task_type="SEQ_CLS")
    if config.finetuning_type == "freeze":
        reward_head(model).requires_grad_(True)  # the head is new: it always trains
    lm_head = language_model_head(model, config.model_name_or_path, device=device,
                                  trust_remote_code=config.trust_remote_code) if config.lm_coefficient else None
    stage_steps.open_output_dir(config)
    pad_id = tokenizer.pad_token_id

    stats = {}

    def before_save(parallel, objective) -> None:
        """On every rank: the reward mean / std over the training responses, for normalizing rewards later
        (RLHF)."""
        with parallel.gathered(objective):
            rewards = score_sequences(model, [q for s in train for q in s.sequences], pad_id=pad_id, device=device,
                                      batch_size=config.per_device_eval_batch_size,
                                      precision=lambda: autocast(device, config))
        stats["mean"], stats["std"] = rewards.mean().item(), rewards.std().item() if rewards.numel() > 1 else 0.0

    def save_final(folder: Path, state_dict: dict | None = None) -> None:
        mean, std = stats["mean"], stats["std"]
        # Sharded, the trained weights arrive gathered (`state_dict`): they go into a whole copy, built here.
        whole = model if state_dict is None else _whole_reward_model(config, device, pad_id, state_dict)
        # A LoRA reward model is saved merged: one ordinary folder that loads as a reward model.
        final = whole.merge_and_unload() if hasattr(whole, "merge_and_unload") else whole
        set_reward_stats(final, mean, std if math.isfinite(std) else 0.0)
        log.info("reward over the training responses: mean %.4f, std %.4f (saved in config.json)", mean, std)
        final.save_pretrained(folder)
        carry_template(tokenizer, config.template)  # scored later as trained
        tokenizer.save_pretrained(folder)
        save_config(config, folder / "posttrain_config.yaml")

    objective = PairwiseRewardObjective(model, config.center_rewards_coefficient, config.lm_coefficient, lm_head)
    trainer = Trainer(config, objective,
                      train_examples=train, eval_examples=evals, collate=lambda s: collate_pairs(s, pad_id),
                      count=count_pairs, save_final=save_final, device=device,
                      run_config=config.model_dump(mode="json"), summary=summary, before_save=before_save,
                      saved_model=model)
    return trainer.train()
