"""How posttrain looks inside a model: one home for the questions every stage asks of it.

- `hf_model`: the transformers model under a PEFT wrapper (or the model itself).
- `prompt_learning_config`: the active P-/prompt-/prefix-tuning config, whose virtual tokens only
  PEFT's own forward adds (so the model must then be run whole).
- `causal_parts`: (decoder body, output head) of a causal LM, so the head runs on the few positions
  that are trained or scored instead of every prompt and padding position.
- `value_parts`: (decoder body, scalar `score` head) of a reward model or critic.
- `selected_logits`: the logits at selected positions, through `causal_parts` where it applies.
- `is_checkpointing`: whether activation checkpointing is on (transformers 5 renamed the flag).
"""

from __future__ import annotations

import torch
from torch import nn

from posttrain.errors import ConfigError


def hf_model(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def prompt_learning_config(model: nn.Module):
    config = getattr(model, "active_peft_config", None)
    return config if config is not None and config.is_prompt_learning else None


def causal_parts(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(body, head), or None where the model must run whole: a prompt-learning adapter (its virtual
    tokens are added by PEFT's forward), a head whose output the model post-processes (Gemma-2's
    soft-capping, Cohere's logit scale), or a layout without a separate body."""
    if prompt_learning_config(model) is not None:
        return None
    hf = hf_model(model)
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    body = getattr(hf, getattr(hf, "base_model_prefix", ""), None)
    if head is None or body is None or body is hf:
        return None
    if any(getattr(hf.config, k, None) for k in ("final_logit_softcapping", "logit_scale")):
        return None
    return body, head


def value_parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(decoder body, scalar head) of a sequence-classification model (PEFT-wrapped or not)."""
    hf = hf_model(model)
    body = getattr(hf, hf.base_model_prefix, None)
    head = getattr(hf, "score", None)
    if body is None or head is None:
        raise ConfigError(f"{type(hf).__name__} has no `{hf.base_model_prefix}` body and `score` head; posttrain "
                          "reads rewards from the sequence-classification layout most decoders share")
    return body, head


def selected_logits(model: nn.Module, inputs: dict, selected: torch.Tensor) -> torch.Tensor:
    """Logits [N, vocab] at the N positions where `selected` [rows, length] is true (aligned with the
    input ids). The head runs on those positions only where the model allows it; otherwise the whole
    forward runs and positions a prompt-learning adapter prepends are dropped."""
    parts = causal_parts(model)
    if parts is not None:
        body, head = parts
        return head(body(**inputs, use_cache=False).last_hidden_state[selected])
    logits = model(**inputs, use_cache=False).logits
    return logits[:, logits.size(1) - selected.size(1):][selected]


def is_checkpointing(model: nn.Module) -> bool:
    hf = hf_model(model)
    flag = getattr(hf, "is_activation_checkpointing", None)
    if flag is None:  # transformers before 5.x: the older name
        flag = getattr(hf, "is_gradient_checkpointing", False)
    return bool(flag)
