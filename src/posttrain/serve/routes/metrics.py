"""GET /metrics in Prometheus' text format: the counters and histograms of serve/prometheus_metrics.py, and the
engine's and server's current counts as gauges."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

from posttrain.serve.dependencies import State
from posttrain.serve.error_responses import documented

router = APIRouter(responses=documented(401))


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(state: State):
    gauges = {**state.worker.load(), "in_flight_requests": state.in_flight,
              "resident_lora_adapters": len(state.registry.resident()),
              "registered_adapters": len(state.registry.list())}
    return PlainTextResponse(state.metrics.render(gauges), media_type="text/plain; version=0.0.4")
