"""The server against bad input and broken adapters: each fails alone, with one clear OpenAI-shaped error.

One server (test_serve's fixture) serves every case; cases that need files (symlink traps, broken
adapters) make them inside the allowed adapter folder and remove them afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from inference_fixtures import adapter_root, lively_model_dir, one_torch_thread  # noqa: F401
from test_serve import client, metric_samples, raw, server  # noqa: F401

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
LOAD = "/v1/load_lora_adapter"
UNLOAD = "/v1/unload_lora_adapter"
HI = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
ABC = {"model": "base", "prompt": "abc", "max_tokens": 2}

# (case, path, body, expected status, fragment of the error message)
BAD_INPUTS = [
    ("NaN temperature", CHAT, {**HI, "temperature": float("nan")}, 400, "temperature"),
    ("infinite top_p", COMPLETIONS, {**ABC, "top_p": float("inf")}, 400, "top_p"),
    ("NaN presence_penalty", CHAT, {**HI, "presence_penalty": float("nan")}, 400, "presence_penalty"),
    ("-Infinity frequency_penalty", COMPLETIONS, {**ABC, "frequency_penalty": float("-inf")}, 400, "frequency_penalty"),
    ("NaN repetition_penalty", COMPLETIONS, {**ABC, "repetition_penalty": float("nan")}, 400, "repetition_penalty"),
    ("booleans as token ids", COMPLETIONS, {**ABC, "prompt": [[False]]}, 400, "prompt"),
    ("a boolean among token ids", COMPLETIONS, {**ABC, "prompt": [True, 5]}, 400, "prompt"),
    ("a boolean stop token id", COMPLETIONS, {**ABC, "stop_token_ids": [True]}, 400, "stop_token_ids"),
    ("a boolean max_tokens", CHAT, {**HI, "max_tokens": True}, 400, "max_tokens"),
    ("zero max_tokens", COMPLETIONS, {**ABC, "max_tokens": 0}, 400, "max_tokens"),
    ("a negative top_k", COMPLETIONS, {**ABC, "top_k": -1}, 400, "top_k"),
    ("an empty stop string", CHAT, {**HI, "stop": ["ok", ""]}, 400, "stop"),
    ("top_logprobs without logprobs", CHAT, {**HI, "top_logprobs": 2}, 400, "top_logprobs"),
    ("echo", COMPLETIONS, {**ABC, "echo": True}, 400, "echo"),
    ("an image content part", CHAT, {**HI, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     400, "text only"),
    ("adapter name ending in a newline", LOAD, {"lora_name": "qv8-again\n", "lora_path": "qv8"}, 400, "not allowed"),
    ("NUL byte in the adapter path", LOAD, {"lora_name": "nul", "lora_path": "qv8\x00"}, 400, "NUL byte"),
    ("over-long adapter path", LOAD, {"lora_name": "long", "lora_path": "a/" * 2500}, 400, "at most 4096"),
    ("over-long file name", LOAD, {"lora_name": "long", "lora_path": "x" * 300}, 400, "too long"),
    ("symlink loop", LOAD, {"lora_name": "loop", "lora_path": "loop-a"}, 400, "symlink loop"),
    ("symlink leading outside", LOAD, {"lora_name": "esc", "lora_path": "escape"}, 400, "outside"),
    ("unloading the operator's adapter", UNLOAD, {"lora_name": "qv8"}, 403, "operator"),
    ("unloading an unknown adapter", UNLOAD, {"lora_name": "nope"}, 404, "does not exist"),
]


@pytest.fixture(scope="module")
def traps(adapter_root, tmp_path_factory):
    """A symlink loop and a symlink to a folder outside, inside the allowed adapter folder."""
    outside = tmp_path_factory.mktemp("outside")
    shutil.copytree(adapter_root / "qv8", outside / "qv8")
    made = [adapter_root / "loop-a", adapter_root / "loop-b", adapter_root / "escape"]
    os.symlink(made[1], made[0])
    os.symlink(made[0], made[1])
    os.symlink(outside / "qv8", made[2])
    yield [str(adapter_root.resolve()), str(outside.resolve())]
    for link in made:
        link.unlink()


@pytest.mark.parametrize("case,path,body,status,fragment", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_a_clear_error(server, traps, case, path, body, status, fragment):
    r = raw(server, "POST", path, json_body=body)
    assert r.status_code == status, (case, r.text)
    error = r.json()["error"]
    assert fragment in error["message"] and error["type"], (case, error)
    assert not any(real in error["message"] for real in traps), f"{case}: the answer shows a server path: {error}"
    models = [m["id"] for m in raw(server, "GET", "/v1/models").json()["data"]]
    assert "qv8" in models and not any("\n" in m for m in models)


def _runtime_copy(adapter_root, name: str):
    shutil.copytree(adapter_root / "qv8", adapter_root / name)
    return adapter_root / name


BREAKAGES = {
    "non-numeric lora_alpha": ("adapter_config.json",
                               lambda text: json.dumps({**json.loads(text), "lora_alpha": "lots"}),
                               "lora_alpha must be a positive number"),
    "config not JSON": ("adapter_config.json", lambda text: "{ not json", "not valid JSON"),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_a_broken_adapter_fails_its_request_alone(server, client, adapter_root, breakage):
    state = server[0]
    name = f"fragile-{len(breakage)}"
    folder = _runtime_copy(adapter_root, name)
    try:
        assert raw(server, "POST", LOAD, json_body={"lora_name": name, "lora_path": name}).status_code == 200
        file, corrupt, reason = BREAKAGES[breakage]
        (folder / file).write_text(corrupt((folder / file).read_text()))
        good = client.completions.create(model="base", prompt="x", max_tokens=48, temperature=0, stream=True,
                                         extra_body={"ignore_eos": True})
        chunks = iter(good)
        next(chunks)  # the good request is running
        bad = raw(server, "POST", COMPLETIONS, json_body={"model": name, "prompt": "abc", "max_tokens": 4})
        assert bad.status_code == 500, bad.text
        error = bad.json()["error"]
        assert name in error["message"] and reason in error["message"] and error["param"] == "model", error
        assert str(adapter_root.resolve()) not in error["message"]
        rest = list(chunks)
        assert rest[-1].choices[0].finish_reason == "length"
        deadline = time.time() + 10
        while state.in_flight and time.time() < deadline:  # the stream's handler finishes after its last chunk
            time.sleep(0.05)
        assert state.in_flight == 0
        assert metric_samples(raw(server, "GET", "/metrics").text)[("posttrain_in_flight_requests", frozenset())] == 0
        assert client.completions.create(model="qv8", prompt="abc", max_tokens=2, temperature=0).choices
    finally:
        raw(server, "POST", UNLOAD, json_body={"lora_name": name})
        shutil.rmtree(folder)
    assert state.engine.running == [] and state.engine.waiting == []


def test_runtime_adapters_are_capped(server, adapter_root):
    registry = server[0].registry
    before = registry.max_runtime_adapters
    registry.max_runtime_adapters = sum(a.runtime for a in registry.list()) + 1
    folders = [_runtime_copy(adapter_root, n) for n in ("cap-1", "cap-2")]
    try:
        assert raw(server, "POST", LOAD, json_body={"lora_name": "cap-1", "lora_path": "cap-1"}).status_code == 200
        r = raw(server, "POST", LOAD, json_body={"lora_name": "cap-2", "lora_path": "cap-2"})
        assert r.status_code == 400 and "at most" in r.json()["error"]["message"], r.text
        assert raw(server, "POST", UNLOAD, json_body={"lora_name": "cap-1"}).status_code == 200
        assert raw(server, "POST", LOAD, json_body={"lora_name": "cap-2", "lora_path": "cap-2"}).status_code == 200
        assert raw(server, "POST", UNLOAD, json_body={"lora_name": "cap-2"}).status_code == 200
    finally:
        registry.max_runtime_adapters = before
        for folder in folders:
            shutil.rmtree(folder)


class _GatedTokenizer:
    """The served tokenizer, except that a long text waits at a gate the test opens: tokenization that is
    still running, observable from outside."""

    def __init__(self, inner):
        self.inner = inner
        self.entered = threading.Semaphore(0)
        self.gate = threading.Event()

    def __call__(self, text, *args, **kwargs):
        if isinstance(text, str) and len(text) > 10_000:
            self.entered.release()
            self.gate.wait(timeout=60)
        return self.inner(text, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_health_answers_while_huge_prompts_are_tokenized(server):
    state = server[0]
    real = state.tokenizer
    gated = state.tokenizer = _GatedTokenizer(real)
    answered = []
    pool = ThreadPoolExecutor(4)
    try:
        huge = {"model": "base", "prompt": "word " * 5_000, "max_tokens": 2}
        futures = [pool.submit(lambda: answered.append(raw(server, "POST", COMPLETIONS, json_body=huge)))
                   for _ in range(4)]
        assert gated.entered.acquire(timeout=30)  # a huge prompt is being tokenized now
        health = raw(server, "GET", "/health", key=None, timeout=10)  # the event loop must still answer
        assert health.status_code == 200 and answered == []
    finally:
        gated.gate.set()
        pool.shutdown(wait=True)
        state.tokenizer = real
    for f in futures:
        f.result()
    assert [r.status_code for r in answered] == [400] * 4
    assert all("at most 128" in r.json()["error"]["message"] for r in answered)


def test_openapi_publishes_the_400_error_model(server):
    r = raw(server, "GET", "/openapi.json")
    assert r.status_code == 200, r.text
    assert "422" not in r.text and "HTTPValidationError" not in r.text
    schema = r.json()
    for path in (CHAT, COMPLETIONS, LOAD):
        responses = schema["paths"][path]["post"]["responses"]
        assert responses["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse"), path
    assert set(schema["components"]["schemas"]["ErrorDetail"]["properties"]) == {"message", "type", "param", "code"}
    assert raw(server, "GET", "/openapi.json", key=None).status_code == 401


def test_metric_label_values_are_escaped():
    from posttrain.serve.prometheus_metrics import Metrics

    odd = 'odd"name\\with\nnewline'
    metrics = Metrics()
    metrics.record(odd, "chat", 200, 3, 4, 0.1)
    text = metrics.render({"running": 0})
    assert all(line.startswith(("#", "posttrain_")) for line in text.splitlines())  # no line broken by the newline
    samples = metric_samples(text)
    assert samples[("posttrain_generation_tokens_total", frozenset({("model", odd)}))] == 4
    assert samples[("posttrain_running", frozenset())] == 0


def test_serve_refuses_a_port_out_of_range(lively_model_dir, capsys):
    from posttrain.cli import main

    assert main(["serve", str(lively_model_dir), "--port", "70000"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--port" in err and "65535" in err and len(err.strip().splitlines()) == 1


class _DeniedTokenizer:
    """The served tokenizer, except that it cannot read a file it needs (an OS permission error)."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_permission_error_is_not_taken_for_disabled_runtime_loading(server):
    state = server[0]
    real = state.tokenizer
    state.tokenizer = _DeniedTokenizer(real)
    try:
        r = raw(server, "POST", COMPLETIONS, json_body=ABC)
    finally:
        state.tokenizer = real
    error = r.json()["error"]
    assert r.status_code == 500 and error["type"] == "server_error", r.text
    assert "PermissionError" in error["message"] and "runtime" not in error["message"], error


def test_an_engine_failure_mid_stream_is_counted_as_a_server_error(server, client):
    state = server[0]
    key = ("posttrain_requests_total", frozenset({("model", "mlp16"), ("endpoint", "completions"), ("status", "500")}))
    before = metric_samples(raw(server, "GET", "/metrics").text).get(key, 0)

    def broken_decode(seqs):
        raise RuntimeError("decode failed")

    state.engine._decode = broken_decode  # the prefill's token streams, the first decode step fails
    try:
        with pytest.raises(openai.APIError, match="decode failed"):
            list(client.completions.create(model="mlp16", prompt="x", max_tokens=8, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True}))
    finally:
        del state.engine._decode
    deadline = time.time() + 10
    while metric_samples(raw(server, "GET", "/metrics").text).get(key, 0) == before:  # counted as its handler ends
        assert time.time() < deadline, "the failed stream was not counted as a 500"
        time.sleep(0.05)
    assert state.engine.running == [] and state.engine.waiting == []


def test_serving_backend_choice_is_said_and_refused_before_loading(lively_model_dir, adapter_root, monkeypatch,
                                                                   caplog, tmp_path):
    """--backend vllm without vLLM is refused naming how to get it; --backend auto off CUDA (or with adapters
    vLLM cannot serve) serves on the engine and says why."""
    import logging

    import torch

    from posttrain.config import ServeConfig
    from posttrain.errors import ConfigError
    from posttrain.serve.vllm_server import pick_backend

    monkeypatch.delenv("POSTTRAIN_VLLM_PYTHON", raising=False)
    settings = lambda **kw: ServeConfig(model=str(lively_model_dir), adapter_dirs=[str(adapter_root)], **kw)  # noqa
    with pytest.raises(ConfigError, match="make vllm"):
        pick_backend(settings(backend="vllm"), torch.device("cpu"))
    with pytest.raises(ConfigError, match="vllm_python: .* is not an executable"):
        pick_backend(settings(backend="vllm", vllm_python=str(tmp_path / "nope")), torch.device("cpu"))
    # A relative vllm_python (as `make vllm` suggests: .venv-vllm/bin/python) still names the same file once the
    # worker runs in its own folder; a venv's python keeps its venv path (a symlink, never resolved).
    venv_python = tmp_path / "env" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.symlink_to(sys.executable)
    monkeypatch.chdir(tmp_path)
    assert pick_backend(settings(backend="vllm", vllm_python="env/bin/python"), torch.device("cpu")) == \
        ("vllm", str(venv_python))
    with caplog.at_level(logging.WARNING, logger="posttrain.serve.vllm_server"):
        assert pick_backend(settings(backend="auto"), torch.device("cpu")) == ("engine", None)
    assert "--backend auto: serving on the built-in engine (not on CUDA)" in caplog.text
    assert pick_backend(settings(), torch.device("cpu")) == ("engine", None)  # the default: the engine, silently
