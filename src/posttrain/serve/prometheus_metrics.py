"""Counters for /metrics, through prometheus_client (one CollectorRegistry per server, so two servers
in one process, as in the tests, never share or clash). The library writes the text format, label
escaping included: a label value with a newline cannot break the exposition."""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)  # queue, first token
GAUGE_HELP = {"running": "Requests decoding in the engine.", "waiting": "Requests queued for a batch slot.",
              "in_flight_requests": "HTTP generation requests being served.",
              "resident_lora_adapters": "LoRA adapters in the stacked bank.",
              "registered_adapters": "Adapters served (operator's and runtime-loaded)."}


class _Gauges:
    """The engine's and server's current counts, read at scrape time (set by `Metrics.render`)."""

    def __init__(self):
        self.values: dict[str, float] = {}

    def collect(self):
        for name, value in self.values.items():
            yield GaugeMetricFamily(f"posttrain_{name}", GAUGE_HELP.get(name, name), value=value)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self._lock = threading.Lock()  # render sets the gauges, then reads them back
        self.requests = Counter("posttrain_requests", "Requests by model (base or adapter), endpoint and HTTP status.",
                                ["model", "endpoint", "status"], registry=self.registry)
        self.prompt_tokens = Counter("posttrain_prompt_tokens", "Prompt tokens processed, by model.", ["model"],
                                     registry=self.registry)
        self.generation_tokens = Counter("posttrain_generation_tokens", "Tokens generated, by model.", ["model"],
                                         registry=self.registry)
        self.latency = Histogram("posttrain_request_latency_seconds",
                                 "End-to-end latency of successful requests, by model.", ["model"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue_time = Histogram("posttrain_request_queue_time_seconds",
                                    "Time from a request's admission to the engine taking it, by model.", ["model"],
                                    buckets=WAIT_BUCKETS, registry=self.registry)
        self.time_to_first_token = Histogram("posttrain_time_to_first_token_seconds",
                                             "Time from a request's admission to its first token, by model.",
                                             ["model"], buckets=WAIT_BUCKETS, registry=self.registry)
        self._gauges = _Gauges()
        self.registry.register(self._gauges)

    def record(self, model: str, endpoint: str, status: int, prompt_tokens: int = 0, generation_tokens: int = 0,
               seconds: float | None = None) -> None:
        self.requests.labels(model, endpoint, str(status)).inc()
        self.prompt_tokens.labels(model).inc(prompt_tokens)
        self.generation_tokens.labels(model).inc(generation_tokens)
        if seconds is not None:
            self.latency.labels(model).observe(seconds)

    def record_timing(self, model: str, admitted_at: float, started_at: float | None,
                      first_token_at: float | None) -> None:
        """Queue time and time to first token of one request (time.perf_counter() stamps; None: never reached)."""
        if started_at is not None:
            self.queue_time.labels(model).observe(max(0.0, started_at - admitted_at))
        if first_token_at is not None:
            self.time_to_first_token.labels(model).observe(max(0.0, first_token_at - admitted_at))

    def render(self, gauges: dict[str, float]) -> str:
        with self._lock:
            self._gauges.values = dict(gauges)
            return generate_latest(self.registry).decode()
