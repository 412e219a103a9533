"""Alarms: the signs of reward hacking or collapse, checked on every logged RL step.

A logged record whose metric drifts past its threshold (config.ALARM_DEFAULTS, overridden by the
`alarms` key) gets `alarm/<name>: 1` in metrics.jsonl (the board shows it) and a warning in the log,
once per alarm until it clears. Drifts are measured against the first logged step of the run (a
resumed run reads it back from metrics.jsonl):

  kl             kl > threshold
  entropy_drop   entropy < threshold x the first step's entropy
  length_ratio   response_length > threshold x the first step's, or < the first step's / threshold
  clip_fraction  clip_fraction > threshold
  truncated      truncated (share of completions cut at max_completion_length) > threshold
  logp_gap       logp_gap (mean |trainer - rollout engine| log-prob of the sampled tokens) > threshold,
                 on steps sampled on the trainer's own weights (staleness 0)
  retain_drop    the retain_metric of retain_eval_dataset (greedy; the total reward eval_retain_reward, or
                 one source's eval_retain_rewards/NAME) fell by more than 1 - threshold of its size before
                 training (threshold x its value there, for a positive value)

An alarm is judged only on records that hold its metric (eval records come every eval_steps): it stays
raised or clear in between. Alarms named in `stop_on_alarms` end the run (trainer.py).
"""

from __future__ import annotations

import logging

from posttrain.config import ALARM_DEFAULTS

log = logging.getLogger(__name__)


class Alarms:
    def __init__(self, overrides: dict[str, float] | None = None, history: list[dict] = (),
                 retain_metric: str = "reward"):
        self.limits = {**ALARM_DEFAULTS, **(overrides or {})}
        self.retained = retain_key(retain_metric)
        self.first: dict[str, float] = {}  # each metric's value at the first step that logged it
        self.raised: set[str] = set()
        for record in history:
            self._note_first(record)

    def _note_first(self, record: dict) -> None:
        for key in ("entropy", "response_length", self.retained):
            if key in record:
                self.first.setdefault(key, record[key])

    def check(self, record: dict) -> dict[str, int]:
        """The alarms this record sets, as `alarm/<name>: 1` entries to log with it."""
        self._note_first(record)
        judged = dict(self._tests(record))
        fired = {name for name, why in judged.items() if why}
        for name in sorted(fired - self.raised):
            log.warning("alarm %s at step %s: %s", name, record.get("step"), self._describe(name, record))
        self.raised = (self.raised - set(judged)) | fired
        return {f"alarm/{name}": 1 for name in sorted(fired)}

    def _tests(self, r: dict):
        """(alarm, fired) for each alarm this record holds the metric of."""
        lim, first = self.limits, self.first
        if "kl" in r:
            yield "kl", r["kl"] > lim["kl"]
        if "entropy" in r and first.get("entropy", 0) > 0:
            yield "entropy_drop", r["entropy"] < lim["entropy_drop"] * first["entropy"]
        if "response_length" in r and first.get("response_length", 0) > 0:
            ratio = r["response_length"] / first["response_length"]
            yield "length_ratio", ratio > lim["length_ratio"] or ratio < 1 / lim["length_ratio"]
        if "clip_fraction" in r:
            yield "clip_fraction", r["clip_fraction"] > lim["clip_fraction"]
        if "truncated" in r:
            yield "truncated", r["truncated"] > lim["truncated"]
        # Samples drawn on older weights (async_rollouts) differ from the trainer's by design: on-policy steps only.
        if "logp_gap" in r:
            yield "logp_gap", not r.get("staleness") and r["logp_gap"] > lim["logp_gap"]
        if self.retained in r and self.retained in first:  # a drop by a share of the size: rewards can be < 0
            start = first[self.retained]
            yield "retain_drop", r[self.retained] < start - (1 - lim["retain_drop"]) * abs(start)

    def _describe(self, name: str, r: dict) -> str:
        metric = {"entropy_drop": "entropy", "length_ratio": "response_length",
                  "retain_drop": self.retained}.get(name, name)
        base = f" (first step: {self.first[metric]:.4g})" if metric in self.first else ""
        return f"{metric} is {r.get(metric, float('nan')):.4g}{base}, threshold {self.limits[name]:g}"


def retain_key(retain_metric: str) -> str:
    """The eval metric retain_drop watches: the total reward, or one reward source's."""
    return "eval_retain_reward" if retain_metric == "reward" else f"eval_retain_rewards/{retain_metric}"
