"""`posttrain serve --backend vllm`: vLLM's OpenAI server behind ours, driven by the real `openai` client.
Run by `make test-vllm` (vLLM's CPU build, in its own environment)."""

from __future__ import annotations

import os

import openai
import pytest
from inference_fixtures import ALL_LINEAR, make_lora, make_prompt_adapter, lively_model_dir  # noqa: F401
from serve_fixtures import free_port, running_server

pytestmark = pytest.mark.vllm
KEY = "k-1"


@pytest.fixture(scope="module")
def adapters(lively_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-adapters")
    make_lora(lively_model_dir, root / "qv8", 8, ["q_proj", "v_proj"], seed=1)
    make_lora(lively_model_dir, root / "all4", 4, ALL_LINEAR, seed=2)
    runtime = tmp_path_factory.mktemp("vllm-runtime")
    make_lora(lively_model_dir, runtime / "late", 8, ALL_LINEAR, seed=3)
    return root, runtime


def _settings(model, **extra):
    from posttrain.config import ServeConfig

    return ServeConfig(model=str(model), served_model_name="base", port=free_port(), api_key=[KEY],
                       max_model_len=160, seed=0, **extra)


def _ask(url: str, model: str, stream: bool = False) -> str:
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    if stream:
        chunks = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "reverse 123"}],
                                                max_tokens=12, temperature=0, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    out = client.completions.create(model=model, prompt="the digits 4 5 6", max_tokens=12, temperature=0)
    return out.choices[0].text


def test_vllm_backend_answers_as_the_engine_does_for_base_and_adapters(lively_model_dir, adapters):
    root, runtime = adapters
    python = os.environ["POSTTRAIN_VLLM_PYTHON"]
    with running_server(_settings(lively_model_dir, adapter_dirs=[str(root), str(runtime)], backend="vllm",
                                  vllm_python=python, allow_runtime_adapters=True)) as (state, url):
        assert state.backend == "vllm"
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        assert {m.id for m in client.models.list().data} == {"base", "all4", "late", "qv8"}
        got = {(m, s): _ask(url, m, s) for m in ("base", "qv8", "all4") for s in (False, True)}
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="nope", prompt="x", max_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        with pytest.raises(openai.BadRequestError):  # this server's path rules, before vLLM sees the path
            client.post("/load_lora_adapter", body={"lora_name": "x", "lora_path": "../escape"}, cast_to=object)
        with pytest.raises(openai.PermissionDeniedError):  # the operator's adapters stay
            client.post("/unload_lora_adapter", body={"lora_name": "late"}, cast_to=object)
        client.post("/load_lora_adapter", body={"lora_name": "late2", "lora_path": "late"}, cast_to=object)
        got["late2", False] = _ask(url, "late2")
        client.post("/unload_lora_adapter", body={"lora_name": "late2"}, cast_to=object)
        with pytest.raises(openai.NotFoundError):
            _ask(url, "late2")
    with running_server(_settings(lively_model_dir, adapter_dirs=[str(root), str(runtime)])) as (state, url):
        for (model, stream), text in got.items():
            want = _ask(url, "late" if model == "late2" else model, stream)
            if stream:  # a stream cut inside a multi-byte character: the engine ends it with U+FFFD, vLLM drops it
                text, want = text.rstrip("\ufffd"), want.rstrip("\ufffd")
            assert text == want, (model, stream, text, want)
    assert len({got["base", False], got["qv8", False], got["all4", False]}) == 3  # the adapters change the output


def test_adapters_vllm_cannot_serve_are_refused_with_the_reason(lively_model_dir, tmp_path):
    from posttrain.errors import ConfigError
    from posttrain.serve.server import build_state

    make_prompt_adapter(lively_model_dir, tmp_path / "pt", "prompt", seed=1)
    python = os.environ["POSTTRAIN_VLLM_PYTHON"]
    with pytest.raises(ConfigError, match="PROMPT_TUNING adapter and vLLM serves LoRA adapters only.*--backend engine"):
        build_state(_settings(lively_model_dir, adapters={"pt": str(tmp_path / "pt")}, backend="vllm",
                              vllm_python=python))


def test_a_killed_server_takes_vllm_with_it(lively_model_dir, tmp_path):
    """`posttrain serve` killed outright (SIGKILL: no shutdown runs) leaves no vLLM server holding the port and
    the memory: vLLM's server gets SIGTERM when the process that started it dies, and ends its own processes."""
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    port = free_port()
    serve = subprocess.Popen([sys.executable, "-m", "posttrain", "serve", str(lively_model_dir), "--backend", "vllm",
                              "--vllm-python", os.environ["POSTTRAIN_VLLM_PYTHON"], "--port", str(port),
                              "--max-model-len", "160"], stdout=subprocess.DEVNULL, stderr=open(tmp_path / "log", "w"))
    vllm = []
    try:
        deadline = time.time() + 300
        while True:
            assert serve.poll() is None and time.time() < deadline, (tmp_path / "log").read_text()[-2000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(1)
        children = subprocess.run(["pgrep", "-P", str(serve.pid)], capture_output=True, text=True).stdout.split()
        # vLLM's server leads a process group of its own, with the processes it started
        vllm = subprocess.run(["pgrep", "-g", ",".join(children)], capture_output=True, text=True).stdout.split()
        vllm = [int(pid) for pid in vllm]
        assert len(vllm) >= 2, "vLLM's server (a child of posttrain serve) and its engine"
        serve.send_signal(signal.SIGKILL)
        serve.wait()
        deadline = time.time() + 60
        while any(_alive(pid) for pid in vllm) and time.time() < deadline:
            time.sleep(0.5)
        assert not any(_alive(pid) for pid in vllm)
    finally:
        if serve.poll() is None:
            serve.kill()
        for pid in vllm:  # what a failure left running
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
