"""`posttrain serve`: load the base model once, register adapters, start the engine thread, run uvicorn
(or, with --backend vllm, start vLLM's server behind this one: serve/vllm_server.py)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from posttrain.data.templates import end_of_turn_ids
from posttrain.config import ServeConfig
from posttrain.errors import ConfigError
from posttrain.serve.vllm_server import build_vllm_state, pick_backend

log = logging.getLogger(__name__)


def _dtype(settings: ServeConfig, device: torch.device) -> torch.dtype:
    if settings.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, settings.dtype)


def build_state(settings: ServeConfig):
    """Everything a server needs, loaded and checked, its engine thread started (stop it with
    `state.worker.stop()`); raises ConfigError on a bad model, adapter or template (the config's own keys
    were checked when it was built)."""
    from posttrain.inference.engine import Engine
    from posttrain.inference.registry import AdapterRegistry
    from posttrain.model.loading import load_model, load_tokenizer, pick_device, resolve_model_path
    from posttrain.serve.state import ServerState
    from posttrain.serve.prometheus_metrics import Metrics
    from posttrain.serve.worker import EngineWorker

    model_dir = resolve_model_path(settings.model, "model")
    for d in settings.adapter_dirs:
        if not Path(d).expanduser().is_dir():
            raise ConfigError(f"--adapter-dir {d}: not a folder")
    device = pick_device(settings.device)
    backend, vllm_python = pick_backend(settings, device)
    if backend == "vllm":  # vLLM holds the model: this process keeps its config, the names and the rules
        from transformers import AutoConfig

        base_config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=settings.trust_remote_code)
        return build_vllm_state(settings, model_dir, base_config, vllm_python)
    tokenizer = load_tokenizer(str(model_dir), settings.trust_remote_code)
    chat_template = base_chat_template(tokenizer, settings.template)  # before any adapter reads it
    end_of_turn = end_of_turn_ids(tokenizer, chat_template) if chat_template else []
    base_name = settings.served_model_name or model_dir.resolve().name

    def build_engine() -> Engine:
        """Run on the engine thread (worker.py says why): every torch op of serving runs on that thread."""
        model = load_model(str(model_dir), device=device, trust_remote_code=settings.trust_remote_code,
                           dtype=_dtype(settings, device)).eval()
        engine = Engine(model, tokenizer, max_batch_size=settings.max_batch_size,
                        max_seq_len=settings.max_model_len, fuse_weights=True, seed=settings.seed)
        registry = AdapterRegistry(engine.dims, model.config, tokenizer, engine.weights.dtype, device,
                                   max_loras=settings.max_loras, allowed_roots=settings.adapter_dirs,
                                   base_name=base_name, max_runtime_adapters=settings.max_runtime_adapters)
        engine.registry = registry
        for name, path in settings.adapters.items():
            registry.add(name, path, trusted=True)  # the operator named it: a bad one stops the start-up
        for d in settings.adapter_dirs:
            registry.scan(d)
        # The engine keeps only the tensors it reads (q/k/v and gate/up as fused copies): returning drops the
        # module and frees the unfused originals.
        return engine

    worker = EngineWorker(build_engine)
    engine = worker.start()
    return ServerState(settings, engine, worker, engine.registry, tokenizer, base_name, Metrics(), int(time.time()),
                       chat_template=chat_template, end_of_turn=end_of_turn)


def base_chat_template(tokenizer, template: str | None) -> str | None:
    """The chat template of the base model (and of adapters that ship none): `--template`, else the model's
    own (a stage saves the one it trained with); checked against the tokenizer. `--template` becomes the base
    tokenizer's own, which adapters without a tokenizer of their own share. None: completions only."""
    from posttrain.data.chat import resolve_template
    from posttrain.data.templates import check_template_encodes

    if not template and not tokenizer.chat_template:
        return None
    source = resolve_template(template, tokenizer)
    check_template_encodes(tokenizer, source, template)
    if template:
        tokenizer.chat_template = source
    return source


def run_server(settings: ServeConfig) -> None:
    import uvicorn

    from posttrain.serve.app import create_app

    state = build_state(settings)
    names = [a.name for a in state.registry.list()]
    print(f"serving {state.base_name} with {len(names)} adapter(s){': ' + ', '.join(names) if names else ''} "
          f"on http://{settings.host}:{settings.port}/v1" + ("  (API key required)" if settings.api_key else ""),
          flush=True)
    try:
        uvicorn.run(create_app(state), host=settings.host, port=settings.port, log_level="warning")
    finally:
        state.worker.stop()  # the engine's thread, or vLLM's server
