"""Supervised fine-tuning (and continued pre-training on `text` rows): read top to bottom.

setup (config -> tokenizer -> data -> model) -> Trainer -> save. Every check on the input runs in
setup, before the model loads and long before the first step.
"""

from __future__ import annotations

import logging

import torch.nn.functional as F
from torch import nn

from posttrain.config import SFTConfig
from posttrain.data.batching import collate, example_length, pack
from posttrain.data.chat import IGNORE_INDEX
from posttrain.data.stage_samples import load_sft_samples
from posttrain.model.parts import selected_logits
from posttrain.train import distributed as dist, stage_steps
from posttrain.train.loop import TrainResult

log = logging.getLogger(__name__)


class CausalLMLoss(nn.Module):
    """Summed next-token cross-entropy over trained positions.

    The output head runs only on the positions that are trained, not on every prompt and padding
    position: with short answers after long prompts that skips most of the head's work and memory
    (model/parts.py `selected_logits`; prompt-learning adapters run through PEFT's whole forward).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict) -> dict:
        targets = batch["targets"]
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        selected = targets != IGNORE_INDEX
        logits = selected_logits(self.model, inputs, selected)
        loss_sum = F.cross_entropy(logits.float(), targets[selected], reduction="sum")
        return {"loss_sum": loss_sum}


def count_trained(batch: dict) -> int:
    return int((batch["targets"] != IGNORE_INDEX).sum())


def run_sft(config: SFTConfig) -> TrainResult:
    device = stage_steps.start_run(config)
    tokenizer = stage_steps.load_stage_tokenizer(config)
    train, evals, report = load_sft_samples(config, tokenizer, main=dist.is_main())
    if dist.is_main():
        log.info("data: %s", report.summary())
    if config.packing:
        train, evals = pack(train, config.cutoff_len), (pack(evals, config.cutoff_len) if evals else [])
        if dist.is_main():
            log.info("packing: %d rows of up to %d tokens", len(train), config.cutoff_len)
    model = stage_steps.load_trainable_model(config, device)
    model, summary = stage_steps.apply_finetuning_type(config, model)
    pad_id = tokenizer.pad_token_id

    def collate_fn(examples):
        batch = collate(examples, pad_id)
        batch["num_tokens"] = sum(example_length(e) for e in examples)
        return batch

    return stage_steps.train_and_save(config, model, tokenizer, CausalLMLoss(model), train, evals,
                                      collate=collate_fn, count=count_trained, device=device, summary=summary)
