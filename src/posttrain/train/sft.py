"""Supervised fine-tuning (and continued pre-training on `text` rows): read top to bottom.

setup (config -> tokenizer -> data -> model) -> Trainer -> save. Every check on the input runs in
setup, before the model loads and long before the first step.
"""

from __future__ import annotations

import logging

import torch.nn.functional as F
from peft import PeftType
from torch import nn

from posttrain.config import SFTConfig
from posttrain.data.batching import collate, example_length, pack
from posttrain.data.chat import IGNORE_INDEX, ChatRenderer
from posttrain.data.formats import load_conversations
from posttrain.data.prepare import tokenize_all
from posttrain.model.loading import load_tokenizer
from posttrain.train import distributed as dist, stage
from posttrain.train.loop import TrainResult

log = logging.getLogger(__name__)


class CausalLMLoss(nn.Module):
    """Summed next-token cross-entropy over trained positions.

    The output head runs only on the positions that are trained, not on every prompt and padding
    position: with short answers after long prompts that skips most of the head's work and memory.
    A LoRA model takes the same path (its layers are injected in place); prompt-learning adapters
    run through PEFT's forward, which prepends their virtual tokens.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        peft_config = getattr(model, "active_peft_config", None)
        self.virtual_tokens = 0
        self.split = True
        if peft_config is not None and peft_config.is_prompt_learning:
            self.split = False
            # prompt/p-tuning prepend positions to the logits; prefix tuning hides its prefix in the KV cache.
            if peft_config.peft_type != PeftType.PREFIX_TUNING:
                self.virtual_tokens = peft_config.num_virtual_tokens
        hf = model.get_base_model() if peft_config is not None else model
        self._hf = [hf]  # in a list: not registered twice as a submodule
        head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
        body = getattr(hf, getattr(hf, "base_model_prefix", ""), None)
        special_logits = any(getattr(hf.config, k, None) for k in ("final_logit_softcapping", "logit_scale"))
        self.split = self.split and head is not None and body is not None and body is not hf and not special_logits

    def forward(self, batch: dict) -> dict:
        targets = batch["targets"]
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        selected = targets != IGNORE_INDEX
        if self.split:
            hf = self._hf[0]
            hidden = getattr(hf, hf.base_model_prefix)(**inputs, use_cache=False).last_hidden_state
            logits = hf.get_output_embeddings()(hidden[selected])
        else:
            logits = self.model(**inputs, use_cache=False).logits[:, self.virtual_tokens:][selected]
        loss_sum = F.cross_entropy(logits.float(), targets[selected], reduction="sum")
        return {"loss_sum": loss_sum}


def count_trained(batch: dict) -> int:
    return int((batch["targets"] != IGNORE_INDEX).sum())


def load_samples(config: SFTConfig, tokenizer):
    """Read, normalize, render and tokenize the training (and eval) data, with a report."""
    renderer = ChatRenderer(tokenizer, config.template, config.train_on_prompt, config.mask_history,
                            config.mask_reasoning)
    convs, eval_convs = stage.load_rows(config, load_conversations)
    train, report = tokenize_all(convs, renderer, config.cutoff_len, config.overlong)
    evals = tokenize_all(eval_convs, renderer, config.cutoff_len, config.overlong)[0] if eval_convs else []
    return train, evals, report, renderer


def run_sft(config: SFTConfig) -> TrainResult:
    device = stage.begin(config)
    tokenizer = load_tokenizer(config.model_name_or_path, config.trust_remote_code)
    train, evals, report, _ = load_samples(config, tokenizer)
    if dist.is_main():
        log.info("data: %s", report.summary())
    if config.packing:
        train, evals = pack(train, config.cutoff_len), (pack(evals, config.cutoff_len) if evals else [])
        if dist.is_main():
            log.info("packing: %d rows of up to %d tokens", len(train), config.cutoff_len)
    model = stage.load_trainable_model(config, device)
    model, summary = stage.adapt(config, model)
    pad_id = tokenizer.pad_token_id

    def collate_fn(examples):
        batch = collate(examples, pad_id)
        batch["num_tokens"] = sum(example_length(e) for e in examples)
        return batch

    return stage.run_trainer(config, model, tokenizer, CausalLMLoss(model), train, evals, collate=collate_fn,
                             count=count_trained, device=device, summary=summary)
