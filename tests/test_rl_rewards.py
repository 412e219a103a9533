"""Reward sources: built-ins, Python functions, a local HTTP endpoint, weights; bad ones refused before training."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from posttrain.cli import main
from posttrain.data.prompts import Prompt
from posttrain.data.schema import Message
from posttrain.errors import ConfigError
from posttrain.train.rl.rewards import (
    BuiltinReward, CompletionBatch, FunctionReward, RemoteReward, RewardError, Rewards)


def _prompts(*answers):
    return [Prompt([Message("user", f"q{i}")], f"q{i}", {"answer": a}, source=f"x.jsonl:{i}")
            for i, a in enumerate(answers, 1)]


def test_builtins():
    prompts = _prompts("123", "4.5", "7")
    batch = CompletionBatch(prompts, [" 123\n", "the answer is 4.50", "no"])
    exact, numeric, fmt = BuiltinReward("exact_match"), BuiltinReward("numeric_match"), BuiltinReward(r"format:\d+")
    for r in (exact, numeric, fmt):
        r.check(prompts)
    assert exact(batch) == [1.0, 0.0, 0.0]
    assert numeric(batch) == [1.0, 1.0, 0.0]
    assert fmt(batch) == [1.0, 0.0, 0.0]
    with pytest.raises(ConfigError, match="no column answer / reference"):
        BuiltinReward("exact_match").check([Prompt([Message("user", "q")], "q", {"label": 1}, source="d.jsonl:3")])
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        BuiltinReward("format:(")


def test_function_reward_gets_prompts_completions_and_columns(tmp_path):
    f = tmp_path / "my_rewards.py"
    f.write_text("def length_bonus(prompts, completions, answer, **kw):\n"
                 "    return [len(c) / 10 + (c == a) for c, a in zip(completions, answer)]\n"
                 "def broken(prompts, completions, **kw):\n    return [1.0]\n")
    r = FunctionReward(f"{f}:length_bonus")
    assert r(CompletionBatch(_prompts("ab", "c"), ["ab", "xyz"])) == [pytest.approx(1.2), pytest.approx(0.3)]
    combined = Rewards([r, BuiltinReward("exact_match")], [0.5, 2.0])
    combined.check(_prompts("ab", "c"))
    total, parts = combined(CompletionBatch(_prompts("ab", "c"), ["ab", "xyz"]))
    assert total.tolist() == pytest.approx([0.5 * 1.2 + 2.0, 0.5 * 0.3])
    assert set(parts) == {"rewards/length_bonus", "rewards/exact_match"}
    with pytest.raises(RewardError, match="expected a list of 2 numbers"):
        FunctionReward(f"{f}:broken")(CompletionBatch(_prompts("a", "b"), ["a", "b"]))


@pytest.mark.parametrize("spec, message", [
    ("missing_file.py:fn", "does not exist"),
    ("{file}:nope", "defines no 'nope'"),
    ("{file}", "not of the form path/to/file.py:function_name"),
    ("{file}:not valid", "not of the form"),
    ("exact", "is not a reward"),
])
def test_bad_function_specs(tmp_path, spec, message):
    f = tmp_path / "r.py"
    f.write_text("def good(prompts, completions, **kw):\n    return [0.0] * len(completions)\n")
    with pytest.raises(ConfigError, match=message):
        from posttrain.train.rl.rewards import make_source

        make_source(spec.format(file=f), 1.0)


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/slow":
            time.sleep(2)
        rewards = [float(c == a) for c, a in zip(body["completions"], body["answer"])]
        data = json.dumps({"rewards": rewards} if self.path != "/bad" else {"oops": 1}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture()
def server():
    httpd = HTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    httpd.server_close()


def test_remote_endpoint(server):
    r = RemoteReward(server + "/score", timeout=5)
    r.check(_prompts("1"))
    assert r(CompletionBatch(_prompts("1", "2"), ["1", "3"])) == [1.0, 0.0]
    with pytest.raises(ConfigError, match="must answer"):
        RemoteReward(server + "/bad", timeout=5).check(_prompts("1"))
    start = time.perf_counter()
    with pytest.raises(RewardError, match="did not answer within 0.3s"):
        RemoteReward(server + "/slow", timeout=0.3)(CompletionBatch(_prompts("1"), ["1"]))
    assert time.perf_counter() - start < 1.5  # the timeout holds: no hang


def test_bad_rewards_fail_before_training(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "reverse 12", "answer": "21"}) + "\n")
    base = [f"model_name_or_path={tiny_model_dir}", f"dataset={data}", "max_steps=1"]
    for out, reward, message in (("o1", "reward_funcs=[nowhere.py:f]", "does not exist"),
                                 ("o2", "reward_funcs=[http://127.0.0.1:9/score]", "unreachable")):
        assert main(["grpo", *base, f"output_dir={tmp_path / out}", reward, "reward_timeout=2"]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / out).exists()
    assert main(["ppo", *base, f"output_dir={tmp_path / 'o4'}"]) == 2
    assert "no reward" in capsys.readouterr().err
    nocol = tmp_path / "nocol.jsonl"
    nocol.write_text(json.dumps({"prompt": "reverse 12"}) + "\n")
    assert main(["grpo", f"model_name_or_path={tiny_model_dir}", f"dataset={nocol}", "max_steps=1",
                 f"output_dir={tmp_path / 'o5'}", "reward_funcs=[exact_match]"]) == 2
    assert "no column answer" in capsys.readouterr().err
