"""Counters for /metrics, written as Prometheus text (no client library needed for a few series)."""

from __future__ import annotations

import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _escape(value) -> str:
    """A label value as the text format requires: backslash, double quote and newline escaped (an unescaped
    newline would end the sample line and corrupt every scrape after it)."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(**labels: str) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests = defaultdict(int)  # (model, endpoint, status) -> count
        self.prompt_tokens = defaultdict(int)  # model -> tokens
        self.generation_tokens = defaultdict(int)
        self.latency_buckets = defaultdict(lambda: [0] * len(LATENCY_BUCKETS))  # model -> cumulative counts
        self.latency_sum = defaultdict(float)
        self.latency_count = defaultdict(int)

    def record(self, model: str, endpoint: str, status: int, prompt_tokens: int = 0, generation_tokens: int = 0,
               seconds: float | None = None) -> None:
        with self._lock:
            self.requests[(model, endpoint, status)] += 1
            self.prompt_tokens[model] += prompt_tokens
            self.generation_tokens[model] += generation_tokens
            if seconds is not None:
                buckets = self.latency_buckets[model]
                for i, bound in enumerate(LATENCY_BUCKETS):
                    if seconds <= bound:
                        buckets[i] += 1
                self.latency_sum[model] += seconds
                self.latency_count[model] += 1

    def render(self, gauges: dict[str, float]) -> str:
        lines = []
        with self._lock:
            lines += ["# HELP posttrain_requests_total Requests by model (base or adapter), endpoint and HTTP status.",
                      "# TYPE posttrain_requests_total counter"]
            for (model, endpoint, status), n in sorted(self.requests.items()):
                lines.append(f"posttrain_requests_total{_labels(model=model, endpoint=endpoint, status=status)} {n}")
            for name, series, help_ in (("prompt_tokens", self.prompt_tokens, "Prompt tokens processed"),
                                        ("generation_tokens", self.generation_tokens, "Tokens generated")):
                lines += [f"# HELP posttrain_{name}_total {help_}, by model.", f"# TYPE posttrain_{name}_total counter"]
                lines += [f"posttrain_{name}_total{_labels(model=m)} {n}" for m, n in sorted(series.items())]
            lines += ["# HELP posttrain_request_latency_seconds End-to-end latency of successful requests, by model.",
                      "# TYPE posttrain_request_latency_seconds histogram"]
            for model in sorted(self.latency_count):
                for bound, n in zip(LATENCY_BUCKETS, self.latency_buckets[model]):
                    lines.append(f"posttrain_request_latency_seconds_bucket{_labels(model=model, le=bound)} {n}")
                lines.append(f"posttrain_request_latency_seconds_bucket{_labels(model=model, le='+Inf')} "
                             f"{self.latency_count[model]}")
                lines.append(f"posttrain_request_latency_seconds_sum{_labels(model=model)} {self.latency_sum[model]:.6f}")
                lines.append(f"posttrain_request_latency_seconds_count{_labels(model=model)} {self.latency_count[model]}")
        for name, value in gauges.items():
            lines += [f"# TYPE posttrain_{name} gauge", f"posttrain_{name} {value}"]
        return "\n".join(lines) + "\n"
