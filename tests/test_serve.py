"""The OpenAI-compatible server, driven over real HTTP by the real `openai` client."""

from __future__ import annotations

import http.client
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import openai
import pytest
from inference_fixtures import (CPU, adapter_root, lively_model_dir, make_lora, one_torch_thread,  # noqa: F401
                                reference_greedy)
from child_env import child_env
from serve_fixtures import free_port, running_server


KEYS = ["test-key-1", "test-key-2"]


@pytest.fixture(scope="module")
def server(lively_model_dir, adapter_root):
    from posttrain.config import ServeConfig

    port = free_port()
    settings = ServeConfig(model=str(lively_model_dir), served_model_name="base", port=port,
                             adapter_dirs=[str(adapter_root)], allow_runtime_adapters=True, api_key=KEYS,
                             max_loras=2, max_model_len=160, max_prompt_tokens=128, max_tokens_limit=64,
                             max_body_bytes=32_000)
    with running_server(settings) as running:
        yield running


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[1] + "/v1", api_key=KEYS[0], max_retries=0)


@dataclass
class Reply:
    status_code: int
    text: str

    def json(self):
        return json.loads(self.text)


def raw(server, method: str, path: str, key: str | None = KEYS[1], json_body=None, chunks=None,
        timeout: float = 30) -> Reply:
    """One plain HTTP request (http.client: also sends chunked bodies, which the openai client never does)."""
    conn = http.client.HTTPConnection("127.0.0.1", int(server[1].rsplit(":", 1)[1]), timeout=timeout)
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    if chunks is not None:
        conn.request(method, path, body=iter(chunks), headers=headers, encode_chunked=True)
    else:
        conn.request(method, path, body=None if json_body is None else json.dumps(json_body), headers=headers)
    response = conn.getresponse()
    reply = Reply(response.status, response.read().decode())
    conn.close()
    return reply


def test_models_lists_base_and_adapters_with_parent(client):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"base", "qv8", "all4", "mlp16", "prompt5", "ptune4", "prefix3"}
    assert models["base"].parent is None
    assert all(models[n].parent == "base" for n in models if n != "base")


def test_completion_uses_the_adapter_named_by_model(client, server, lively_model_dir, adapter_root):
    from peft import PeftModel

    from posttrain.model.loading import load_model

    tok = server[0].tokenizer
    prompt = "the quick brown fox"
    ids = tok(prompt)["input_ids"]
    merged = PeftModel.from_pretrained(load_model(str(lively_model_dir), device=CPU), str(adapter_root / "all4"))
    expected = reference_greedy(merged.merge_and_unload().eval(), ids, 10)
    got = client.completions.create(model="all4", prompt=prompt, max_tokens=10, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert got.choices[0].text == tok.decode(expected, skip_special_tokens=True)
    assert got.usage.prompt_tokens == len(ids) and got.usage.completion_tokens == 10
    base = client.completions.create(model="base", prompt=prompt, max_tokens=10, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert base.choices[0].text != got.choices[0].text


def test_chat_and_its_stream_agree(client):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "reverse 12345"}]
    whole = client.chat.completions.create(model="qv8", messages=messages, max_tokens=12, temperature=0,
                                           logprobs=True, top_logprobs=2)
    choice = whole.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert len(choice.logprobs.content) == whole.usage.completion_tokens
    assert all(len(lp.top_logprobs) == 2 for lp in choice.logprobs.content)
    chunks = list(client.chat.completions.create(model="qv8", messages=messages, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [choice.finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completion_stream_with_stop_string(client):
    whole = client.completions.create(model="prompt5", prompt="hello there", max_tokens=20, temperature=0,
                                      extra_body={"ignore_eos": True})
    text = whole.choices[0].text
    stop = text[5:8]
    streamed = list(client.completions.create(model="prompt5", prompt="hello there", max_tokens=20, temperature=0,
                                              stop=[stop], stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in streamed) == text[:text.index(stop)]
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_concurrent_requests_for_different_adapters(client):
    jobs = [(name, prompt) for name in ("base", "qv8", "all4", "mlp16", "ptune4", "prefix3") for prompt in ("abc", "x y z")]

    def ask(job):
        name, prompt = job
        return client.completions.create(model=name, prompt=prompt, max_tokens=8, temperature=0,
                                         extra_body={"ignore_eos": True}).choices[0].text

    alone = [ask(j) for j in jobs]  # one at a time
    with ThreadPoolExecutor(len(jobs)) as pool:  # all at once: shared batches, adapters evicted (max_loras=2)
        together = list(pool.map(ask, jobs))
    assert together == alone
    assert len(set(alone[::2])) == 6  # every model answers differently


def test_n_choices_with_a_seed(client):
    a = client.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                       temperature=1.0, n=2, seed=3)
    b = client.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                       temperature=1.0, n=2, seed=3)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.choices[0].message.content != a.choices[1].message.content


def test_unknown_model_is_404_in_openai_shape(client, server):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    r = raw(server, "POST", "/v1/completions", json_body={"model": "nope", "prompt": "x"})
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found" and r.json()["error"]["type"] == "invalid_request_error"


def test_api_keys(server):
    assert raw(server, "GET", "/health", key=None).status_code == 200
    for key in (None, "wrong", KEYS[0] + "x", ""):
        r = raw(server, "GET", "/v1/models", key=key)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert raw(server, "GET", "/metrics", key=None).status_code == 401
    assert raw(server, "GET", "/v1/models", key=KEYS[1]).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server[1] + "/v1", api_key="wrong", max_retries=0).models.list()


def test_bad_parameters_are_400_with_the_field(server):
    body = {"model": "base", "messages": [{"role": "user", "content": "hi"}]}
    cases = [({"temperature": -1}, "temperature"), ({"max_tokens": 65}, "max_tokens"), ({"n": 99}, "n"),
             ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
             ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role")]
    for extra, param in cases:
        r = raw(server, "POST", "/v1/chat/completions", json_body={**body, **extra})
        assert r.status_code == 400, (extra, r.text)
        assert r.json()["error"]["param"] == param
    long = raw(server, "POST", "/v1/completions", json_body={"model": "base", "prompt": list(range(100, 300))})
    assert long.status_code == 400 and "at most 128" in long.json()["error"]["message"]
    context = raw(server, "POST", "/v1/completions", json_body={"model": "base", "prompt": list(range(100, 220)),
                                                          "max_tokens": 64, "ignore_eos": True})
    assert context.status_code == 400 and context.json()["error"]["code"] == "context_length_exceeded"


def test_body_size_limit_is_413(server):
    big = {"model": "base", "prompt": "x" * 40_000}
    assert raw(server, "POST", "/v1/completions", json_body=big).status_code == 413
    body = json.dumps(big).encode()
    chunked = raw(server, "POST", "/v1/completions", chunks=[body[i:i + 8192] for i in range(0, len(body), 8192)])
    assert chunked.status_code == 413


def test_concurrency_limit_is_429(server, client):
    state = server[0]
    limit = state.settings.max_concurrent_requests
    state.settings.max_concurrent_requests = 1
    try:
        stream = client.completions.create(model="base", prompt="x", max_tokens=64, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        next(iter(stream))  # the first request is in flight
        r = raw(server, "POST", "/v1/completions", json_body={"model": "base", "prompt": "y", "max_tokens": 2})
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        stream.close()  # the client leaves: its rows are aborted and the slot frees
        deadline = time.time() + 10
        while state.in_flight and time.time() < deadline:
            time.sleep(0.05)
        assert raw(server, "POST", "/v1/completions",
                   json_body={"model": "base", "prompt": "y", "max_tokens": 2}).status_code == 200
    finally:
        state.settings.max_concurrent_requests = limit


def test_runtime_load_and_unload(server, client, adapter_root, lively_model_dir, tmp_path):
    make_lora(lively_model_dir, adapter_root / "fresh", 8, ["o_proj"], seed=11)
    r = raw(server, "POST", "/v1/load_lora_adapter", json_body={"lora_name": "fresh", "lora_path": "fresh"})
    assert r.status_code == 200, r.text
    out = client.completions.create(model="fresh", prompt="abc", max_tokens=4, temperature=0)
    assert out.model == "fresh"
    assert raw(server, "POST", "/v1/load_lora_adapter",
               json_body={"lora_name": "fresh", "lora_path": "fresh"}).status_code == 400  # name taken
    assert raw(server, "POST", "/v1/unload_lora_adapter", json_body={"lora_name": "fresh"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="fresh", prompt="abc", max_tokens=4)
    assert raw(server, "POST", "/v1/unload_lora_adapter", json_body={"lora_name": "fresh"}).status_code == 404
    bad_name = raw(server, "POST", "/v1/load_lora_adapter", json_body={"lora_name": "../x", "lora_path": "qv8"})
    assert bad_name.status_code == 400 and "not allowed" in bad_name.json()["error"]["message"]


def test_runtime_load_refuses_path_escapes(server, adapter_root, lively_model_dir, tmp_path):
    outside = make_lora(lively_model_dir, tmp_path / "outside", 4, ["q_proj"], seed=12)
    link = adapter_root / "link-out"
    os.symlink(outside, link)
    try:
        for path in ["../outside", str(outside), "link-out", str(link), "qv8/../../outside", "/etc"]:
            r = raw(server, "POST", "/v1/load_lora_adapter", json_body={"lora_name": "esc", "lora_path": path})
            assert r.status_code == 400, path
            assert "outside" in r.json()["error"]["message"] or "'..'" in r.json()["error"]["message"], path
    finally:
        link.unlink()
    assert "esc" not in [m["id"] for m in raw(server, "GET", "/v1/models").json()["data"]]


def test_runtime_load_refuses_an_adapter_for_another_model(server, adapter_root, tmp_path):
    from posttrain.model.tiny import write_tiny_model

    small = write_tiny_model(tmp_path / "small", size="small")
    make_lora(small, adapter_root / "for-small", 4, ["q_proj", "v_proj"], seed=1)
    r = raw(server, "POST", "/v1/load_lora_adapter", json_body={"lora_name": "for-small", "lora_path": "for-small"})
    message = r.json()["error"]["message"]
    assert r.status_code == 400 and ("hidden_size" in message or "different base model" in message), message


def test_runtime_loading_can_be_disabled(server):
    state = server[0]
    state.settings.allow_runtime_adapters = False
    try:
        r = raw(server, "POST", "/v1/load_lora_adapter", json_body={"lora_name": "x", "lora_path": "qv8"})
        assert r.status_code == 403 and "--allow-runtime-adapters" in r.json()["error"]["message"]
    finally:
        state.settings.allow_runtime_adapters = True


def metric_samples(text: str) -> dict[tuple[str, frozenset], float]:
    """/metrics parsed as Prometheus parses it (label order and number formatting do not matter)."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_count_per_adapter(server, client):
    client.completions.create(model="mlp16", prompt="m", max_tokens=3, temperature=0, extra_body={"ignore_eos": True})
    samples = metric_samples(raw(server, "GET", "/metrics").text)
    mlp16 = frozenset({("model", "mlp16")})
    assert samples[("posttrain_requests_total", mlp16 | {("endpoint", "completions"), ("status", "200")})] >= 1
    assert samples[("posttrain_generation_tokens_total", mlp16)] >= 3
    assert samples[("posttrain_request_latency_seconds_count", mlp16)] >= 1
    assert ("posttrain_running", frozenset()) in samples and ("posttrain_resident_lora_adapters", frozenset()) in samples


def test_cli_refuses_bad_flags_before_loading(tmp_path, capsys):
    from posttrain.cli import main

    assert main(["serve", str(tmp_path), "--adapter", "no-equals-sign"]) == 2
    assert "NAME=PATH" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--allow-runtime-adapters"]) == 2
    assert "--adapter-dir" in capsys.readouterr().err


def test_an_adapter_with_its_own_chat_template_uses_it(server, client, adapter_root):
    import shutil

    template = ("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>{% endif %}")
    shutil.copytree(adapter_root / "qv8", adapter_root / "templated")
    (adapter_root / "templated" / "chat_template.jinja").write_text(template)
    assert raw(server, "POST", "/v1/load_lora_adapter",
               json_body={"lora_name": "templated", "lora_path": "templated"}).status_code == 200
    tok = server[0].tokenizer
    messages = [{"role": "user", "content": "reverse 12345"}]
    own = tok(tok.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True),
              add_special_tokens=False)["input_ids"]
    base = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
               add_special_tokens=False)["input_ids"]
    assert len(own) != len(base)
    for model, expected in (("templated", own), ("qv8", base)):
        reply = client.chat.completions.create(model=model, messages=messages, max_tokens=2, temperature=0)
        assert reply.usage.prompt_tokens == len(expected), model


def test_posttrain_serve_command_end_to_end(lively_model_dir, adapter_root):
    import subprocess
    import sys

    port = free_port()
    env = child_env()
    proc = subprocess.Popen([sys.executable, "-m", "posttrain", "serve", str(lively_model_dir), "--port", str(port),
                             "--adapter", f"math={adapter_root / 'all4'}", "--api-key", "cli-key"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if raw((None, f"http://127.0.0.1:{port}"), "GET", "/health", key=None).status_code == 200:
                    break
            except OSError:
                pass
            assert time.time() < deadline, "posttrain serve did not come up"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="cli-key", max_retries=0)
        assert [m.id for m in client.models.list().data] == [lively_model_dir.name, "math"]
        reply = client.chat.completions.create(model="math", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=3, temperature=0)
        assert reply.choices[0].message.role == "assistant"
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_the_engine_thread_loads_the_model_and_builds_the_engine(lively_model_dir, adapter_root, monkeypatch):
    """Every torch op of serving runs on the engine thread, loading included: a model loaded on the main thread
    leaves that thread an OpenMP team of its own, and with two teams libgomp makes each decode op wait for a
    sleeping worker (serve/worker.py)."""
    import threading

    from posttrain.config import ServeConfig
    from posttrain.inference import engine as engine_module
    from posttrain.inference import registry as registry_module
    from posttrain.model import loading
    from posttrain.serve.server import build_state

    ran_on: dict[str, list[threading.Thread]] = {"load_model": [], "Engine": [], "read_lora": []}

    def on_thread(name, fn):
        def recorded(*args, **kwargs):
            ran_on[name].append(threading.current_thread())
            return fn(*args, **kwargs)
        return recorded

    monkeypatch.setattr(loading, "load_model", on_thread("load_model", loading.load_model))
    monkeypatch.setattr(engine_module.Engine, "__init__", on_thread("Engine", engine_module.Engine.__init__))
    monkeypatch.setattr(registry_module, "read_lora", on_thread("read_lora", registry_module.read_lora))
    state = build_state(ServeConfig(model=str(lively_model_dir), adapters={"math": str(adapter_root / "all4")},
                                    port=free_port()))
    try:
        engine_thread = state.worker._thread
        assert engine_thread is not threading.current_thread() and state.worker.alive
        assert ran_on["load_model"] == [engine_thread] and ran_on["Engine"] == [engine_thread]
        assert ran_on["read_lora"] == [engine_thread]  # the named adapter, read at start-up
        assert state.engine is state.worker.engine and state.registry is state.engine.registry
    finally:
        state.worker.stop()
    assert not state.worker.alive


def test_a_start_up_failure_on_the_engine_thread_reaches_the_caller(lively_model_dir, tmp_path):
    import threading

    from posttrain.config import ServeConfig
    from posttrain.errors import ConfigError
    from posttrain.serve.server import build_state

    before = set(threading.enumerate())
    with pytest.raises(ConfigError, match="is not an adapter folder"):  # empty: no adapter_config.json
        build_state(ServeConfig(model=str(lively_model_dir), adapters={"broken": str(tmp_path)}, port=free_port()))
    assert not any(t.name == "posttrain-engine" for t in set(threading.enumerate()) - before)


def test_metrics_time_to_first_token_and_queue_time(server, client):
    label = frozenset({("model", "ptune4")})
    names = ("posttrain_time_to_first_token_seconds", "posttrain_request_queue_time_seconds")
    before = metric_samples(raw(server, "GET", "/metrics").text)
    client.completions.create(model="ptune4", prompt="q", max_tokens=2, temperature=0, extra_body={"ignore_eos": True})
    list(client.completions.create(model="ptune4", prompt="q", max_tokens=2, temperature=0, stream=True,
                                   extra_body={"ignore_eos": True}))
    deadline = time.time() + 10
    while True:  # a stream is counted when its handler ends, just after the client read the last chunk
        after = metric_samples(raw(server, "GET", "/metrics").text)
        if after.get((names[0] + "_count", label), 0) - before.get((names[0] + "_count", label), 0) >= 2:
            break
        assert time.time() < deadline, "the stream's timings were not recorded"
        time.sleep(0.05)

    def grew(sample: str) -> float:
        return after[(sample, label)] - before.get((sample, label), 0)

    for name in names:
        assert grew(name + "_count") == 2, name
    latency = grew("posttrain_request_latency_seconds_sum")
    assert 0 <= grew(names[1] + "_sum") <= grew(names[0] + "_sum") <= latency  # queued, then a token, then done


def test_prompt_tokens_count_a_prompt_once_whatever_n(server, client):
    label = frozenset({("model", "all4")})
    before = metric_samples(raw(server, "GET", "/metrics").text).get(("posttrain_prompt_tokens_total", label), 0)
    reply = client.chat.completions.create(model="all4", messages=[{"role": "user", "content": "count me once"}],
                                           max_tokens=2, n=3, temperature=1.0, seed=5)
    after = metric_samples(raw(server, "GET", "/metrics").text)[("posttrain_prompt_tokens_total", label)]
    assert after - before == reply.usage.prompt_tokens  # as usage (and streams) count it, not n times


def test_a_prefix_adapter_without_max_tokens_fits_the_context(server):
    # prefix3's virtual positions take context as the prompt does: the default max_tokens leaves room for them
    r = raw(server, "POST", "/v1/completions", json_body={"model": "prefix3", "prompt": list(range(100, 200)),
                                                          "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] == "length"


def test_unknown_paths_and_methods_answer_in_openai_shape(server):
    for method, path, status in (("GET", "/v1/nope", 404), ("GET", "/v1/completions", 405)):
        r = raw(server, method, path)
        assert r.status_code == status, r.text
        assert r.json()["error"]["message"] and r.json()["error"]["type"] == "invalid_request_error"


def test_a_body_that_is_not_json(server):
    r = raw(server, "POST", "/v1/completions", chunks=[b'{"model": "base", "prompt": '])
    assert r.status_code == 400 and r.json()["error"]["param"] is None, r.text
    assert "not valid JSON" in r.json()["error"]["message"]
    assert raw(server, "POST", "/v1/completions", key=None, chunks=[b"{oops"]).status_code == 401  # the key first
