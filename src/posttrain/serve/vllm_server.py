"""`posttrain serve --backend vllm`: vLLM's OpenAI server in a process of its own, behind this server.

This server keeps everything a client meets before generation: the API keys, the body limit, the
concurrency slots, the adapter names and their path rules (the same AdapterRegistry, without its
weight bank), 404 for an unknown model, /v1/models, /health and /metrics. Generation requests that
pass go to vLLM as they came (streamed back chunk by chunk); runtime adapter loads are checked here,
then handed to vLLM. vLLM serves LoRA adapters only: a prompt-, P- or prefix-tuning adapter, or a
DoRA one, is refused at start with the reason (`--backend auto` serves such a set on the engine).
vLLM listens on loopback only, on a port of its own; its log goes to a file named at start.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from posttrain.config import ServeConfig
from posttrain.errors import ConfigError
from posttrain.generation.vllm_backend import vllm_env, vllm_lora_rank
from posttrain.generation.vllm_process import end_group, module_dying_with_us, start_group
from posttrain.inference.lora import check_base_model, read_adapter_config
from posttrain.inference.registry import Adapter, AdapterError, AdapterRegistry
from posttrain.serve.prometheus_metrics import Metrics

log = logging.getLogger(__name__)


def vllm_refuses(config: dict) -> str | None:
    """Why vLLM cannot serve an adapter with this adapter_config.json, or None when it can."""
    kind = config.get("peft_type")
    if kind != "LORA":
        return f"it is a {kind} adapter and vLLM serves LoRA adapters only"
    if config.get("use_dora"):
        return "it is a DoRA adapter, which vLLM does not serve"
    return None


class VLLMAdapters(AdapterRegistry):
    """The engine's name table and path rules; reading an adapter only checks vLLM can serve it."""

    def __init__(self, base_config, **kwargs):
        super().__init__(None, base_config, None, None, None, **kwargs)

    def _read_files(self, name: str, folder: Path) -> Adapter:
        config = read_adapter_config(folder)
        check_base_model(config, folder, self.base_config)
        why = vllm_refuses(config)
        if why is not None:
            raise AdapterError(f"{folder}: {why}; serve it with --backend engine (or auto)")
        return Adapter(name, folder, "lora", None, None, rank=int(config.get("r", 8)))

    def resident(self) -> list[str]:
        return [a.name for a in self.list()]


class VLLMProcess:
    """vLLM's OpenAI server, started and watched; `alive` for /health, `load` for /metrics."""

    def __init__(self, command: list[str], env: dict, log_path: Path, port: int):
        self.log_path, self.port = log_path, port
        self.url = f"http://127.0.0.1:{port}"
        self.proc = start_group(command, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, env=env)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def load(self) -> dict:
        return {}

    def wait_ready(self, timeout: float) -> None:
        import httpx

        deadline = time.time() + timeout
        while time.time() < deadline:
            if not self.alive:
                self.stop()  # the processes it started
                raise ConfigError(f"vLLM's server ended while starting (exit {self.proc.returncode}); its log ends:\n"
                                  + "\n".join(self.log_path.read_text(errors="replace").splitlines()[-15:]))
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise ConfigError(f"vLLM's server did not answer within {timeout:.0f} s; see {self.log_path}")

    def stop(self) -> None:
        end_group(self.proc, timeout=30)  # vLLM's own processes too, also where the server itself died


@dataclass
class VLLMServerState:
    """What the routes share, as ServerState is for the engine (health and metrics read the same names)."""

    settings: ServeConfig
    worker: VLLMProcess
    registry: VLLMAdapters
    base_name: str
    metrics: Metrics
    created: int
    max_model_len: int
    client: object = None  # an httpx.AsyncClient to vLLM, opened with the app
    in_flight: int = 0
    backend: str = "vllm"
    served: dict = field(default_factory=dict)

    def serves(self, name: str) -> bool:
        return name == self.base_name or name in {a.name for a in self.registry.list()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_vllm_state(settings: ServeConfig, model_dir: Path, base_config, vllm_python: str) -> VLLMServerState:
    import torch

    base_name = settings.served_model_name or model_dir.resolve().name
    # As the engine serves: bfloat16 on CUDA, float32 on CPU, unless --dtype says.
    dtype = settings.dtype if settings.dtype != "auto" else "bfloat16" if torch.cuda.is_available() else "float32"
    registry = VLLMAdapters(base_config, max_loras=settings.max_loras, allowed_roots=settings.adapter_dirs,
                            base_name=base_name, max_runtime_adapters=settings.max_runtime_adapters)
    for name, path in settings.adapters.items():
        registry.add(name, path, trusted=True)
    for d in settings.adapter_dirs:
        registry.scan(d)
    limit = getattr(base_config, "max_position_embeddings", None) or 2048
    max_model_len = min(settings.max_model_len or limit, limit)
    port = _free_port()
    command = ["--model", str(model_dir), "--served-model-name", base_name, "--host", "127.0.0.1", "--port", str(port),
               "--max-model-len", str(max_model_len), "--max-num-seqs", str(settings.max_batch_size), "--dtype", dtype]
    if settings.seed is not None:
        command += ["--seed", str(settings.seed)]
    if settings.trust_remote_code:
        command.append("--trust-remote-code")
    if settings.template:
        from posttrain.data.chat import resolve_template
        from posttrain.model.loading import load_tokenizer

        template = Path(tempfile.mkdtemp(prefix="posttrain-serve-")) / "chat_template.jinja"
        template.write_text(resolve_template(settings.template, load_tokenizer(str(model_dir))))
        command += ["--chat-template", str(template)]
    adapters = registry.list()
    if adapters or settings.allow_runtime_adapters:
        rank = max([a.rank for a in adapters] + [16 if settings.allow_runtime_adapters else 8])
        command += ["--enable-lora", "--max-loras", str(settings.max_loras),
                    "--max-lora-rank", str(vllm_lora_rank(rank))]
        if adapters:
            command += ["--lora-modules", *[f"{a.name}={a.path}" for a in adapters]]
    if not torch.cuda.is_available():
        command.append("--enforce-eager")  # on CPU, compiling costs most of a minute at start and gains little
    env = vllm_env()
    if settings.allow_runtime_adapters:
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    log_path = Path(tempfile.mkstemp(prefix="posttrain-vllm-server-", suffix=".log")[1])
    log.info("starting vLLM's server (%s); its log: %s", vllm_python, log_path)
    process = VLLMProcess(module_dying_with_us(vllm_python, "vllm.entrypoints.openai.api_server", command), env,
                          log_path, port)
    process.wait_ready(timeout=600)
    return VLLMServerState(settings, process, registry, base_name, Metrics(), int(time.time()), max_model_len)


def pick_backend(settings: ServeConfig, device) -> tuple[str, str | None]:
    """("vllm", its Python) or ("engine", None) for `settings.backend`; auto says which and why."""
    from posttrain.generation.vllm_backend import find_vllm_python

    if settings.backend == "engine":
        return "engine", None
    python = find_vllm_python(settings.vllm_python)
    if settings.backend == "vllm":
        if python is None:
            raise ConfigError("--backend vllm needs vLLM: `make vllm` sets up its CPU build (then --vllm-python "
                              ".venv-vllm/bin/python, or $POSTTRAIN_VLLM_PYTHON), or `pip install vllm` on a GPU")
        return "vllm", python
    refused = [f"{name} ({why})" for name, why in _static_refusals(settings)]
    if device.type != "cuda" or python is None or refused:
        why = ("not on CUDA" if device.type != "cuda" else "vLLM is not installed" if python is None
               else "vLLM cannot serve " + ", ".join(refused))
        log.warning("--backend auto: serving on the built-in engine (%s)", why)
        return "engine", None
    return "vllm", python


def _static_refusals(settings: ServeConfig):
    folders = dict(settings.adapters)
    for d in settings.adapter_dirs:
        root = Path(d).expanduser()
        if root.is_dir():
            folders.update({sub.name: sub for sub in root.iterdir() if (sub / "adapter_config.json").is_file()})
    for name, folder in folders.items():
        try:
            why = vllm_refuses(read_adapter_config(Path(folder).expanduser()))
        except AdapterError:
            continue  # the registry reports a broken adapter as it always does
        if why:
            yield name, why
