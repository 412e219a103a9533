"""Everything `posttrain serve` can be told, with its limits; checked before the model loads."""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain.errors import ConfigError


@dataclass
class ServeSettings:
    model: str  # a local HF model folder
    served_model_name: str | None = None  # the base's name in the API; default: the folder's name
    host: str = "127.0.0.1"
    port: int = 8000
    template: str | None = None  # chat template (built-in name or .jinja path) for the base and template-less adapters
    adapters: dict[str, str] = field(default_factory=dict)  # name -> folder (operator-given: any path)
    adapter_dirs: list[str] = field(default_factory=list)  # every adapter inside is served; runtime loads stay inside
    allow_runtime_adapters: bool = False  # POST /v1/load_lora_adapter and /v1/unload_lora_adapter
    max_loras: int = 8  # LoRA adapters resident in the stacked bank at once (LRU)
    max_runtime_adapters: int = 16  # adapters registered through the API at once (each holds its tokenizer etc.)
    api_keys: list[str] = field(default_factory=list)  # empty: no auth
    max_batch_size: int = 32  # rows decoded together
    max_model_len: int | None = None  # context length (default: the model's)
    max_prompt_tokens: int | None = None  # default: max_model_len - 1
    max_tokens_limit: int | None = None  # the largest max_tokens a request may ask (default: max_model_len)
    max_body_bytes: int = 1 << 20
    max_concurrent_requests: int = 256
    max_n: int = 8
    device: str = "auto"
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    trust_remote_code: bool = False
    seed: int | None = None

    def check(self) -> None:
        for name, value in (("max_loras", self.max_loras), ("max_batch_size", self.max_batch_size),
                            ("max_runtime_adapters", self.max_runtime_adapters),
                            ("max_body_bytes", self.max_body_bytes),
                            ("max_concurrent_requests", self.max_concurrent_requests), ("max_n", self.max_n)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be between 0 and 65535 (0: any free port), got {self.port!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.allow_runtime_adapters and not self.adapter_dirs:
            raise ConfigError("--allow-runtime-adapters needs at least one --adapter-dir: runtime loads may only "
                              "come from folders you allowed")
        if any(not k for k in self.api_keys):
            raise ConfigError("--api-key must not be empty")
