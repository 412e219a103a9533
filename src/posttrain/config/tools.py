"""The configs of the commands that train nothing: export, serve, score, chat, compare."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from posttrain.config.args import _Strict


class ExportConfig(_Strict):
    """`posttrain export`: merge a LoRA adapter into its base and write a standalone model folder."""

    model_name_or_path: str | None = Field(
        None, description="the base folder; null: the base named in the adapter's adapter_config.json")
    adapter_name_or_path: str = Field(description="the LoRA adapter folder to merge")
    export_dir: str = Field(description="where the merged model goes")
    export_dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        "auto", description="auto (the base's own dtype) | float32 | bfloat16 | float16")
    overwrite_output_dir: bool = Field(False, description="replace an export_dir that holds an earlier export")
    trust_remote_code: bool = Field(False, description="run Python code shipped in the model folder")


def _one_or_list(value: Any) -> Any:
    """A single value where a list is expected (`api_key: KEY`, one --flag) is a list of one."""
    return [value] if isinstance(value, str) else value


class ServeConfig(_Strict):
    """`posttrain serve`: an OpenAI-compatible server of one base model and many adapters.

    Keys that `vllm serve` also has carry its names (model, served_model_name, host, port, api_key,
    max_model_len, max_loras, dtype, seed); its chat_template, lora_modules and max_num_seqs are aliases.
    """

    model: str = Field(description="the base model folder")
    served_model_name: str | None = Field(None, description="the base model's name in the API; null: its folder's")
    template: str | None = Field(
        None, description="chat template of the base and of adapters that ship none: a built-in name or a .jinja "
                          "path; null: the model's own (a posttrain stage saves it with its output)")
    adapters: dict[str, str] = Field(
        default_factory=dict, description="serve these PEFT adapter folders as models: {name: path}, or NAME=PATH "
                                          "items (--adapter NAME=PATH)")
    adapter_dirs: list[str] = Field(
        default_factory=list, description="serve every adapter folder inside these, named after its folder; runtime "
                                          "loads may only come from them")
    allow_runtime_adapters: bool = Field(
        False, description="enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter")
    max_loras: int = Field(8, ge=1, description="LoRA adapters resident at once (the least recently used leave)")
    max_runtime_adapters: int = Field(
        16, ge=1, description="adapters loaded through the API at once; more are refused until one is unloaded")
    api_key: list[str] = Field(
        default_factory=list, description="require 'Authorization: Bearer KEY' on every route but /health: a key or "
                                          "a list ($POSTTRAIN_API_KEY adds one); empty: no key")
    host: str = Field("127.0.0.1", description="the address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="the port to listen on; 0: any free port")
    max_batch_size: int = Field(32, ge=1, description="sequences decoded together")
    max_model_len: int | None = Field(None, ge=1, description="context length in tokens; null: the model's")
    max_prompt_tokens: int | None = Field(None, ge=1, description="longest prompt accepted; null: max_model_len - 1")
    max_tokens_limit: int | None = Field(
        None, ge=1, description="largest max_tokens a request may ask for; null: max_model_len")
    max_n: int = Field(8, ge=1, description="most completions one request may ask for (n)")
    max_body_bytes: int = Field(1 << 20, ge=1, description="largest request body in bytes")
    max_concurrent_requests: int = Field(256, ge=1, description="requests generating at once; more get HTTP 429")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto | cpu | cuda (auto: cuda if present)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16 | float16")
    seed: int | None = Field(None, description="seed of the sampled requests that give none; null: unseeded")
    trust_remote_code: bool = Field(False, description="run Python code shipped in the model folder")
    backend: Literal["engine", "vllm", "auto"] = Field(
        "engine", description="engine (built in: LoRA, prompt, P- and prefix-tuning adapters in one batch) | vllm "
                              "(vLLM's OpenAI server behind this one: LoRA adapters) | auto (vllm on CUDA when "
                              "installed and every adapter is LoRA, else the engine)")
    vllm_python: str | None = Field(
        None, description="vllm: the Python of an environment with vLLM; null: $POSTTRAIN_VLLM_PYTHON, else this "
                          "Python when it imports vllm")

    @field_validator("adapters", mode="before")
    @classmethod
    def _adapters_from_pairs(cls, value: Any) -> Any:
        if not isinstance(value, (str, list)):
            return value  # a mapping, or something pydantic refuses with the type it wants
        adapters: dict[str, str] = {}
        for item in _one_or_list(value):
            name, sep, path = item.partition("=") if isinstance(item, str) else ("", "", "")
            if not (sep and name and path):
                raise ValueError(f"{item!r}: an adapter is given as NAME=PATH")
            if name in adapters:
                raise ValueError(f"adapter {name!r} is given twice")
            adapters[name] = path
        return adapters

    @field_validator("adapter_dirs", "api_key", mode="before")
    @classmethod
    def _listed(cls, value: Any) -> Any:
        return _one_or_list(value)

    @model_validator(mode="after")
    def _check_serve(self):
        if any(not key for key in self.api_key):
            raise ValueError("api_key (--api-key) must not be empty")
        if self.allow_runtime_adapters and not self.adapter_dirs:
            raise ValueError("allow_runtime_adapters needs at least one folder in adapter_dirs (--adapter-dir DIR): "
                             "runtime loads may only come from folders you allowed")
        return self


class ScoreConfig(_Strict):
    """`posttrain score`: score prompt/response rows, or chosen/rejected pairs, with a reward model."""

    model: str = Field(description="a reward-model folder written by `posttrain rm`")
    data: str = Field(description="rows in any SFT format (the last assistant message is scored), or preference "
                                  "pairs (the pair accuracy is reported)")
    output: str | None = Field(None, description="write one JSON line per row here; null: print them")
    template: str | None = Field(
        None, description="chat template; null: the one the model was trained with, else the tokenizer's")
    batch_size: int = Field(16, ge=1, description="rows scored together")
    cutoff_len: int | None = Field(
        None, ge=2, description="longer rows keep their first tokens, as `posttrain rm` trains (a warning counts "
                                "them); null: the model's training cutoff_len, else 4096")
    trust_remote_code: bool = Field(False, description="run Python code shipped in the model folder")


class ChatConfig(_Strict):
    """`posttrain chat`: talk to a model folder, interactively or one-shot (prompt)."""

    model: str = Field(description="a model folder, or an adapter folder (its base loads under it)")
    adapter: str | None = Field(None, description="a PEFT adapter folder to apply on top of model")
    prompt: str | None = Field(None, description="answer this one message and exit; null: interactive")
    system: str | None = Field(None, description="a system message in front of the conversation")
    template: str | None = Field(
        None, description="chat template: a built-in name or a .jinja path; null: the folder's own")
    max_new_tokens: int | None = Field(
        None, ge=1, description="longest answer in tokens; null (and at most): what the context leaves after the "
                                "prompt")
    temperature: float = Field(0.0, ge=0, description="sampling temperature; 0: greedy")
    trust_remote_code: bool = Field(False, description="run Python code shipped in the model folder")


def _default_compare_methods() -> list[str]:
    from posttrain.compare import DEFAULT_METHODS

    return list(DEFAULT_METHODS)


class CompareConfig(_Strict):
    """`posttrain compare`: full vs LoRA vs P-tuning (or other methods) on the embedded task or your own data,
    one measured table."""

    output_dir: str = Field("runs/compare", description="where each method's run and the table go")
    methods: list[str] = Field(
        default_factory=_default_compare_methods, description="full | lora | ptuning | prompt_tuning | "
                                                              "prefix_tuning | freeze: a list, or comma-separated")
    steps: int = Field(400, ge=1, description="optimizer steps, the same for every method")
    batch_size: int = Field(32, ge=1, description="rows per step, the same for every method")
    base: str | None = Field(None, description="a local model folder to start from; null: a fresh tiny model")
    data: str | None = Field(
        None, description="SFT rows in any SFT format, a tenth (at most 200) held out and scored by exact match of "
                          "the last assistant turn; null: the embedded task")
    template: str | None = Field(
        None, description="chat template every method trains and answers with: a built-in name or a .jinja path; "
                          "null: the base's own")

    @field_validator("methods", mode="before")
    @classmethod
    def _split_methods(cls, value: Any) -> Any:
        if not isinstance(value, (str, list)):
            return value
        return [part.strip() for item in _one_or_list(value)
                for part in (item.split(",") if isinstance(item, str) else [item])]

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, methods: list[str]) -> list[str]:
        from posttrain.compare import METHODS

        unknown = [m for m in methods if m not in METHODS]
        if unknown or not methods:
            raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}" if unknown
                             else f"no method to compare; choose from {', '.join(METHODS)}")
        return methods
