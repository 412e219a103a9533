"""Completions from the actor as it is right now, through the generation backend (generation/).

`rollout_backend` picks it: the built-in engine reads the actor's live parameters (a LoRA actor from
merged copies recomputed before each batch), so an optimizer step is seen by the next rollout with
no weight sync; vLLM runs in a worker process and receives the weights after each update
(`update_weights`: all of them, or only a LoRA actor's adapter); transformers' `generate` covers the
models the engine does not (another architecture, a DoRA actor).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from posttrain.generation.backend import open_backend
from posttrain.inference.sampling import SamplingParams


@dataclass
class Rollout:
    prompt_ids: list[int]
    response_ids: list[int]  # the generated tokens, with the stop token when the model stopped
    text: str  # the response decoded without special tokens: what the rewards read
    stopped: bool  # False: cut at max_completion_length
    logprobs: list[float] | None = None  # the sampler's log-prob of each response token, when asked


class RolloutSampler:
    def __init__(self, model, tokenizer, *, max_batch_size: int, seed: int, end_of_turn: list[int] = (),
                 backend: str = "engine", vllm_options: dict | None = None, placed=None):
        """`end_of_turn`: the chat template's end-of-turn tokens (data/templates.py), stops beside EOS. `placed`:
        a placement.RaySession, to sample in a Ray actor of its own."""
        self.end_of_turn = list(end_of_turn)
        if placed is not None:
            from posttrain.train.rl.placement import RayRolloutBackend

            self.backend = RayRolloutBackend(placed, model, tokenizer, kind=backend, max_batch_size=max_batch_size,
                                             seed=seed, vllm_options=vllm_options)
        else:
            self.backend = open_backend(backend, model, tokenizer, max_batch_size=max_batch_size, seed=seed,
                                        vllm_options=vllm_options, purpose="rollouts")

    def sample(self, prompts: list[list[int]], *, max_new_tokens: int, temperature: float, top_p: float = 1.0,
               top_k: int = 0, seeds: list[int] | None = None, logprobs: bool = False) -> list[Rollout]:
        """One completion per prompt (repeat a prompt in the list for a group); temperature 0 is greedy.
        `seeds`: one per row, so a row's sample does not depend on which other rows share the batch
        (or the process); without them the engine draws seeds in row order. `logprobs`: keep the sampler's
        log-prob of each sampled token (of the unscaled logits)."""
        return self.finish(self.start(prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                      top_k=top_k, seeds=seeds, logprobs=logprobs))

    def start(self, prompts: list[list[int]], *, max_new_tokens: int, temperature: float, top_p: float = 1.0,
              top_k: int = 0, seeds: list[int] | None = None, logprobs: bool = False) -> tuple:
        """`sample` begun on the weights as they are now; `finish` gives its rollouts (async_rollouts)."""
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                stop_token_ids=self.end_of_turn, logprobs=0 if logprobs else None)
        plist = [replace(params, seed=s) for s in seeds] if seeds is not None else [params] * len(prompts)
        return self.backend.submit(prompts, plist), prompts, logprobs

    def finish(self, started: tuple) -> list[Rollout]:
        handle, prompts, logprobs = started
        done = self.backend.collect(handle)
        return [Rollout(p, c.token_ids, c.text, c.finish_reason == "stop",
                        [t.logprob for t in c.logprobs] if logprobs else None) for p, c in zip(prompts, done)]

    def update_weights(self) -> None:
        """The actor trained since the last rollouts: sample from its current weights from now on."""
        self.backend.update_weights()

    def close(self) -> None:
        self.backend.close()


def vllm_options(config) -> dict:
    """The vLLM backend's options from an RL config's keys."""
    return {"python": config.vllm_python, "gpu_memory_utilization": config.vllm_gpu_memory_utilization,
            "max_model_len": config.cutoff_len + config.max_completion_length,
            "enable_sleep_mode": config.vllm_enable_sleep_mode}
