"""The generation backend protocol and the choice of an implementation.

A backend turns token-id prompts and sampling parameters into completions (token ids, text, finish
reason, and the sampled tokens' log-probs when asked), one per prompt and in order. Each request's
`seed` fixes its sample whatever else shares the batch. A backend built over a model that keeps
training is told so with `update_weights()` after each optimizer step; the engine and transformers
read the live parameters, vLLM receives them (all weights, or only a LoRA actor's adapter).

`rollout_backend: auto` takes vLLM on CUDA when it is installed, else the engine; a model the engine
does not run falls to transformers' `generate` with a one-line notice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Protocol

import torch

from posttrain.config import GENERATION_BACKENDS as BACKENDS
from posttrain.errors import ConfigError
from posttrain.inference.sampling import SamplingParams, TokenChoice

log = logging.getLogger(__name__)
_noticed: set[str] = set()  # fallbacks already announced: once per process and reason


@dataclass
class Completion:
    text: str  # the generated text, without special tokens
    token_ids: list[int]  # with the stop token when the model stopped
    finish_reason: str  # "stop" or "length"
    logprobs: list[TokenChoice] = field(default_factory=list)  # when the request asked for them


class GenerationBackend(Protocol):
    name: str
    max_seq_len: int  # prompt + completion tokens the backend can hold for one request

    def generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[Completion]:
        ...

    def submit(self, prompts: list[list[int]], params: list[SamplingParams]) -> object:
        """Start generating (on the weights as they are now) and return a handle for `collect`. A backend
        in another process (vLLM) works while the caller trains; one in this process works right here."""

    def collect(self, handle: object) -> list[Completion]:
        ...

    def update_weights(self) -> None:
        """The model trained since the last call: generate from its current weights from now on."""

    def close(self) -> None:
        ...


class GeneratesHere:
    """For backends in this process: `submit` does the work at once, `collect` hands it back."""

    def submit(self, prompts: list[list[int]], params: list[SamplingParams]) -> object:
        return self.generate(prompts, params)

    def collect(self, handle: object) -> list[Completion]:
        return handle


def open_backend(kind: str, model, tokenizer, *, max_batch_size: int = 32, seed: int | None = None,
                 vllm_options: dict | None = None, purpose: str = "generation") -> GenerationBackend:
    """A backend of `kind` (BACKENDS) over `model`. `vllm_options` (vllm_backend.VLLMOptions fields) are needed
    for vllm: where vLLM's Python is and how much memory it may take. `purpose` names the caller in notices."""
    if kind not in BACKENDS:
        raise ConfigError(f"unknown generation backend {kind!r}; choose one of {', '.join(BACKENDS)}")
    auto = kind == "auto"
    if auto:
        kind = "vllm" if _vllm_wanted(model, vllm_options) else "engine"
    if kind == "vllm":
        from posttrain.generation.vllm_backend import VLLMBackend

        try:
            return VLLMBackend(model, tokenizer, seed=seed, **(vllm_options or {}))
        except ConfigError as why:  # auto: a model vLLM cannot sample as trained goes to the engine, said once
            if not auto:
                raise
            _notice(f"{purpose} run on the built-in engine: {why}")
            kind = "engine"
    if kind == "engine":
        from posttrain.generation.engine_backend import EngineBackend

        try:
            return EngineBackend(model, tokenizer, max_batch_size=max_batch_size, seed=seed)
        except ConfigError as why:
            _notice(f"{purpose} run on transformers' generate: the built-in engine does not cover this model ({why})")
    from posttrain.generation.hf_backend import HFBackend

    return HFBackend(model, tokenizer, max_batch_size=max_batch_size)


def _notice(text: str) -> None:
    if text not in _noticed:
        _noticed.add(text)
        log.warning(text)


def _vllm_wanted(model, vllm_options: dict | None) -> bool:
    """auto: vLLM where it pays (a GPU) and is there to use."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return False
    from posttrain.generation.vllm_backend import find_vllm_python

    return find_vllm_python((vllm_options or {}).get("python")) is not None


def stop_ids_of(model, tokenizer) -> set[int]:
    """The ids a completion ends at by default: the tokenizer's EOS and the model's generation_config EOS."""
    ids = set()
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def model_device(model) -> torch.device:
    return next(model.parameters()).device
