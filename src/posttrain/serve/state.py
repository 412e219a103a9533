"""What every route of one server shares: the engine and its worker thread, the adapters, the settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain.config import ServeConfig
from posttrain.inference.engine import Engine
from posttrain.inference.registry import AdapterRegistry
from posttrain.serve.prometheus_metrics import Metrics
from posttrain.serve.worker import EngineWorker


@dataclass
class ServerState:
    settings: ServeConfig
    engine: Engine
    worker: EngineWorker
    registry: AdapterRegistry
    tokenizer: object
    base_name: str
    metrics: Metrics
    created: int
    in_flight: int = 0  # generation requests admitted and not yet answered (dependencies.generation_slot)
    chat_template: str | None = None  # the base's (--template, else its own); also for adapters that ship none
    end_of_turn: list[int] = field(default_factory=list)  # its end-of-turn token: chats stop there too

    @property
    def max_model_len(self) -> int:
        return self.engine.max_seq_len

    def serves(self, name: str) -> bool:
        return name == self.base_name or name in {a.name for a in self.registry.list()}
