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
from posttrain.data.chat import IGNORE_INDEX, ChatRenderer
from posttrain.data.formats import load_conversations
from posttrain.data.cache import TokenizeOptions, tokenize_rows
from posttrain.data.prepare import SFT
from posttrain.data.templates import check_template_encodes
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


def load_samples(config: SFTConfig, tokenizer):
    """Read, normalize, render and tokenize the training (and eval) data, with a report (tokenized in
    `preprocessing_num_workers` processes, or read back from the tokenized cache: data/cache.py)."""
    renderer = ChatRenderer(tokenizer, config.template, config.train_on_prompt, config.mask_history,
                            config.mask_reasoning)
    convs, eval_convs = stage_steps.load_rows(config, load_conversations)
    if not all(c.is_text for c in convs + eval_convs):  # text rows (continued pre-training) use no template
        check_template_encodes(tokenizer, renderer.template, config.template)
    options = TokenizeOptions.from_config(config, main=dist.is_main())
    train, report = tokenize_rows(SFT, convs, renderer, config.cutoff_len, config.overlong, options)
    evals = (tokenize_rows(SFT, eval_convs, renderer, config.cutoff_len, config.overlong, options)[0]
             if eval_convs else [])
    return train, evals, report, renderer


def run_sft(config: SFTConfig) -> TrainResult:
    device = stage_steps.begin(config)
    tokenizer = stage_steps.load_stage_tokenizer(config)
    train, evals, report, _ = load_samples(config, tokenizer)
    if dist.is_main():
        log.info("data: %s", report.summary())
    if config.packing:
        train, evals = pack(train, config.cutoff_len), (pack(evals, config.cutoff_len) if evals else [])
        if dist.is_main():
            log.info("packing: %d rows of up to %d tokens", len(train), config.cutoff_len)
    model = stage_steps.load_trainable_model(config, device)
    model, summary = stage_steps.adapt(config, model)
    pad_id = tokenizer.pad_token_id

    def collate_fn(examples):
        batch = collate(examples, pad_id)
        batch["num_tokens"] = sum(example_length(e) for e in examples)
        return batch

    return stage_steps.run_trainer(config, model, tokenizer, CausalLMLoss(model), train, evals, collate=collate_fn,
                             count=count_trained, device=device, summary=summary)
