"""rollouts.jsonl: a bounded sample of each step's completions (`log_completions`, as TRL calls it), to
see what the policy actually writes. One JSON line per completion:

  {"step", "prompt", "completion", "rewards": {source: score}, "reward" (the weighted total, before
   normalization or clipping), "advantage" (mean over the completion's tokens), "length" (tokens),
   "truncated" (cut at max_completion_length)}

Whole groups come first (the completions of one prompt side by side), up to `log_completions_per_step`.
A resumed run keeps the lines up to the step it resumes from, as metrics.jsonl does.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from posttrain.data.prompts import Prompt

FILE = "rollouts.jsonl"


def prompt_text(prompt: Prompt) -> str:
    """The prompt as the row gave it: a string, or its messages one per line as `role: content`."""
    if isinstance(prompt.raw, str):
        return prompt.raw
    return "\n".join(f"{m.role}: {m.content}" for m in prompt.messages)


def token_means(values: torch.Tensor, mask: torch.Tensor) -> list[float]:
    """Each row's mean over its masked tokens (an advantage per completion; constant rows stay as they are)."""
    m = mask.float()
    return ((values * m).sum(-1) / m.sum(-1).clamp(min=1)).tolist()


class CompletionLog:
    def __init__(self, output_dir: str | Path, per_step: int, resume_step: int = 0):
        self.path = Path(output_dir) / FILE
        self.per_step = per_step
        if self.path.exists():  # keep only lines up to the step we resume from
            kept = [l for l in self.path.read_text().splitlines()
                    if l.strip() and json.loads(l).get("step", 0) <= resume_step]
            self.path.write_text("".join(l + "\n" for l in kept))

    def write(self, step: int, prompts: list[Prompt], rollouts: list, totals: torch.Tensor, per_source: torch.Tensor,
              names: list[str], advantages: list[float]) -> None:
        """`rollouts` in group order (each prompt's completions consecutive), as the trainer samples them."""
        n = min(self.per_step, len(rollouts))
        with open(self.path, "a") as f:
            for i in range(n):
                r = rollouts[i]
                f.write(json.dumps({
                    "step": step, "prompt": prompt_text(prompts[i]), "completion": r.text,
                    "rewards": {name: round(per_source[s, i].item(), 6) for s, name in enumerate(names)},
                    "reward": round(totals[i].item(), 6), "advantage": round(advantages[i], 6),
                    "length": len(r.response_ids), "truncated": not r.stopped}) + "\n")
