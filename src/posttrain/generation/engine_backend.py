"""The built-in engine as a generation backend, over a model that may still be training.

The engine is built with `fuse_weights=False`: it holds references to the model's parameters, not
copies, so every optimizer step is seen by the next call with no weight sync. A LoRA model runs from
merged copies of its adapted matrices, recomputed before each call (inference/weights.py); a
prompt-learning model's virtual tokens are its prompt encoder's output at the time of the call, run
as the server runs a saved adapter. Models the engine's forward does not cover raise ConfigError
here, and open_backend falls to transformers.
"""

from __future__ import annotations

from pathlib import Path

from posttrain.generation.backend import Completion, GeneratesHere
from posttrain.inference.sampling import SamplingParams
from posttrain.model.parts import prompt_learning_config


def split_prompt_learning(model):
    """(model the engine runs, the prompt-learning PeftModel around it or None)."""
    if prompt_learning_config(model) is not None:
        return model.get_base_model(), model
    return model, None


def live_adapter(prompt_model, engine, tokenizer):
    """The engine's Adapter for a prompt-learning PeftModel's active adapter, as its weights are now."""
    from posttrain.inference.prompt_tuning import PrefixKV, from_peft_model
    from posttrain.inference.registry import Adapter

    held = from_peft_model(prompt_model, engine.dims, engine.weights.dtype, engine.device)
    if isinstance(held, PrefixKV):
        return Adapter(held.name, Path(), "prefix", tokenizer, None, prefix=held)
    return Adapter(held.name, Path(), "prompt", tokenizer, None, prompt=held)


class EngineBackend(GeneratesHere):
    name = "engine"

    def __init__(self, model, tokenizer, *, max_batch_size: int = 32, seed: int | None = None):
        from posttrain.inference.engine import Engine

        base, self.prompt_model = split_prompt_learning(model)
        self.tokenizer = tokenizer
        self.engine = Engine(base, tokenizer, max_batch_size=max_batch_size, fuse_weights=False, seed=seed)
        self.virtual_tokens = 0
        if self.prompt_model is not None:
            held = live_adapter(self.prompt_model, self.engine, tokenizer)
            self.virtual_tokens = (held.prompt or held.prefix).num_virtual_tokens
        self.max_seq_len = self.engine.max_seq_len - self.virtual_tokens
        self.stop_ids = set(self.engine.model_stop_ids)

    def generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[Completion]:
        self.engine.weights.refresh()  # a LoRA model's merged copies follow its last update
        adapter = live_adapter(self.prompt_model, self.engine, self.tokenizer) if self.prompt_model else None
        done = self.engine.generate(prompts, params, [adapter] * len(prompts))
        return [Completion(c.text, c.token_ids, c.finish_reason, c.logprobs) for c in done]

    def update_weights(self) -> None:
        """Nothing to send: the engine reads the live parameters (merged LoRA copies are redone per call)."""

    def close(self) -> None:
        self.engine = None

