"""`posttrain board` over runs this suite makes: the status each run leaves, the JSON API, its guards, and
the page itself in a real headless browser (Debian's chromium): runs list, curves, the rollout table of
a GRPO run, a live update while a run writes, and a non-blank screenshot."""

from __future__ import annotations

import html
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from posttrain.cli import main
from posttrain.data.synthetic import split_task, write_jsonl

from conftest import sft_overrides

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Skipped only on a developer's machine without chromium; CI installs it (.ci/run), so there they must run.
needs_chromium = pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),
                                    reason="no chromium binary (make test installs Debian's)")
LENGTH_REWARD = "def length(prompts, completions, **kw):\n    return [len(c) / 10 for c in completions]\n"


@pytest.fixture(scope="module")
def runs_dir(tiny_model_dir, task_data, tmp_path_factory):
    """Real runs: a finished SFT and GRPO run, a diverged (failed) SFT run."""
    root = tmp_path_factory.mktemp("board") / "runs"
    data = tmp_path_factory.mktemp("board-data")
    assert main(["sft", *sft_overrides(tiny_model_dir, task_data, root / "sft", max_steps=10, logging_steps=2)]) == 0
    train, _ = split_task(64, 0, seed=7)
    prompts = write_jsonl([{"prompt": r["messages"][0]["content"], "answer": r["answer"]} for r in train],
                          data / "prompts.jsonl")
    (data / "length.py").write_text(LENGTH_REWARD)
    assert main(["grpo", f"model_name_or_path={tiny_model_dir}", f"dataset={prompts}",
                 f"output_dir={root / 'rl' / 'grpo'}",
                 f"reward_funcs=[{data / 'length.py'}:length,exact_match]", "max_completion_length=8",
                 "rollout_batch_size=3", "num_generations=2", "per_device_train_batch_size=6", "max_steps=3",
                 "log_completions_per_step=4", "disable_tqdm=true", "plot_loss=false"]) == 0
    assert main(["sft", *sft_overrides(tiny_model_dir, task_data, root / "diverged", learning_rate=1e30, max_steps=6,
                                       logging_steps=1)]) == 2
    return root


class Board:
    """The board's app served by uvicorn on a free local port, in a thread."""

    def __init__(self, root: Path, api_key: str | None = None, middleware=None, allow_launch: bool = False):
        import uvicorn

        from posttrain.board.app import create_app

        app = create_app(root, api_key, allow_launch=allow_launch)
        if middleware:
            app.middleware("http")(middleware)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "the board did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def get(self, path: str, headers: dict | None = None) -> tuple[int, dict | str, dict]:
        req = urllib.request.Request(self.url(path), headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                body, status, hdrs = r.read().decode(), r.status, dict(r.headers)
        except urllib.error.HTTPError as err:
            body, status, hdrs = err.read().decode(), err.code, dict(err.headers)
        try:
            return status, json.loads(body), hdrs
        except ValueError:
            return status, body, hdrs


@pytest.fixture(scope="module")
def board(runs_dir):
    with Board(runs_dir) as b:
        yield b


def chromium(url: str, tmp_path: Path, *flags: str, budget_ms: int = 5000) -> str:
    """The page's DOM (or a screenshot, with --screenshot=...) after its scripts ran for `budget_ms` of page time."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", f"--virtual-time-budget={budget_ms}",
           "--window-size=1400,1000", *(flags or ["--dump-dom"]), url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert out.returncode == 0 and (out.stdout or flags), out.stderr[-3000:]
    return out.stdout


# ---- what runs write ---------------------------------------------------------------------------

def test_runs_leave_their_status(runs_dir):
    sft = json.loads((runs_dir / "sft" / "run_status.json").read_text())
    assert sft["status"] == "finished" and sft["ended"] >= sft["started"]
    failed = json.loads((runs_dir / "diverged" / "run_status.json").read_text())
    assert failed["status"] == "failed" and "training diverged" in failed["error"]
    records = [json.loads(l) for l in (runs_dir / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert all(isinstance(r["wall_time_s"], float) for r in records)  # the board's x axis by time


def test_grpo_writes_a_bounded_sample_of_rollouts_and_alarms(runs_dir):
    out = runs_dir / "rl" / "grpo"
    rows = [json.loads(l) for l in (out / "rollouts.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1] * 4 + [2] * 4 + [3] * 4  # log_completions_per_step of the 6 sampled
    for r in rows:
        assert isinstance(r["prompt"], str) and r["prompt"] and isinstance(r["completion"], str)
        assert set(r["rewards"]) == {"length", "exact_match"}
        assert r["rewards"]["length"] == pytest.approx(len(r["completion"]) / 10, abs=1e-5)
        assert r["reward"] == pytest.approx(r["rewards"]["length"] + r["rewards"]["exact_match"], abs=1e-5)
        assert 1 <= r["length"] <= 8 and isinstance(r["truncated"], bool)
    # GRPO's advantage is the group z-score of the reward: the two completions of a prompt get opposite signs.
    for a, b in zip(rows[0::2], rows[1::2]):
        assert a["prompt"] == b["prompt"]
        if a["reward"] != b["reward"]:
            assert (a["advantage"] > 0) == (a["reward"] > b["reward"])
            assert a["advantage"] == pytest.approx(-b["advantage"])
    # Completions of 8 tokens from an untrained model are cut: over the default threshold, the alarm is logged.
    steps = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if '"reward_mean"' in l]
    assert all(s.get("alarm/truncated") == 1 for s in steps if s["truncated"] > 0.5)
    # The rollout engine samples the very policy being trained: the trainer's log-probs of its tokens agree.
    assert all(0 <= s["logp_gap"] < 1e-3 for s in steps) and not any("alarm/logp_gap" in s for s in steps)


def test_a_resumed_run_keeps_the_rollouts_up_to_its_checkpoint(tmp_path):
    from posttrain.train.rl.completions import CompletionLog

    (tmp_path / "rollouts.jsonl").write_text("".join(json.dumps({"step": s, "completion": str(s)}) + "\n"
                                                     for s in (1, 1, 2, 3, 4)))
    CompletionLog(tmp_path, per_step=4, resume_step=2)
    assert [json.loads(l)["step"] for l in (tmp_path / "rollouts.jsonl").read_text().splitlines()] == [1, 1, 2]


def test_alarms_fire_on_drift_and_clear():
    from posttrain.train.rl.alarms import Alarms

    alarms = Alarms({"kl": 0.5})
    assert alarms.check({"step": 1, "kl": 0.1, "entropy": 2.0, "response_length": 20, "clip_fraction": 0.0}) == {}
    fired = alarms.check({"step": 2, "kl": 0.7, "entropy": 0.3, "response_length": 70, "clip_fraction": 0.4})
    assert fired == {"alarm/kl": 1, "alarm/entropy_drop": 1, "alarm/length_ratio": 1, "alarm/clip_fraction": 1}
    assert alarms.check({"step": 3, "kl": 0.2, "entropy": 1.9, "response_length": 5, "clip_fraction": 0.1}) == \
        {"alarm/length_ratio": 1}  # 5 tokens is under a third of the first step's 20
    resumed = Alarms(history=[{"step": 0, "eval_reward": 0.1}, {"step": 1, "entropy": 2.0, "response_length": 20}])
    assert resumed.check({"step": 5, "entropy": 0.3, "response_length": 20}) == {"alarm/entropy_drop": 1}


def test_retain_drop_compares_the_retained_skill_with_its_value_before_training():
    from posttrain.train.rl.alarms import Alarms

    alarms = Alarms()
    assert alarms.check({"step": 0, "eval_retain_reward": 0.98, "eval_reward": 0.2}) == {}
    assert alarms.check({"step": 4, "eval_retain_reward": 0.94, "eval_reward": 0.9}) == {}  # 0.94 >= 0.95 x 0.98
    assert alarms.check({"step": 8, "eval_retain_reward": 0.90}) == {"alarm/retain_drop": 1}
    # A step record (no eval in it) neither clears nor re-raises it: the next eval does.
    assert alarms.check({"step": 9, "kl": 0.01}) == {} and alarms.raised == {"retain_drop"}
    assert alarms.check({"step": 12, "eval_retain_reward": 0.97}) == {} and alarms.raised == set()
    resumed = Alarms(history=[{"step": 0, "eval_retain_reward": 1.0}, {"step": 1, "kl": 0.0}])
    assert resumed.check({"step": 5, "eval_retain_reward": 0.5}) == {"alarm/retain_drop": 1}


def test_retain_drop_measures_a_drop_by_the_size_of_a_negative_start_and_can_watch_one_reward():
    from posttrain.train.rl.alarms import Alarms

    alarms = Alarms()  # a reward model's score can start below 0: unchanged is no drop
    assert alarms.check({"step": 0, "eval_retain_reward": -2.0}) == {}
    assert alarms.check({"step": 4, "eval_retain_reward": -2.0}) == {}
    assert alarms.check({"step": 8, "eval_retain_reward": -2.05}) == {}  # within 5% of 2.0
    assert alarms.check({"step": 12, "eval_retain_reward": -2.2}) == {"alarm/retain_drop": 1}
    one = Alarms(retain_metric="exact_match")  # the skill alone, whatever the total reward does
    assert one.check({"step": 0, "eval_retain_reward": 0.1, "eval_retain_rewards/exact_match": 1.0}) == {}
    assert one.check({"step": 4, "eval_retain_reward": 0.0, "eval_retain_rewards/exact_match": 0.99}) == {}
    assert one.check({"step": 8, "eval_retain_reward": 0.5, "eval_retain_rewards/exact_match": 0.9}) == \
        {"alarm/retain_drop": 1}


def test_a_run_stops_at_an_alarm_it_is_told_to_stop_on(tiny_model_dir, tmp_path):
    """retain_eval_dataset is scored beside eval_dataset at every eval; an alarm in stop_on_alarms ends the run
    after that step with the model saved (here `truncated`: an untrained model's 8-token answers are all cut)."""
    train, _ = split_task(32, 0, seed=7)
    prompts = write_jsonl([{"prompt": r["messages"][0]["content"], "answer": r["answer"]} for r in train],
                          tmp_path / "prompts.jsonl")
    out = tmp_path / "grpo"
    assert main(["grpo", f"model_name_or_path={tiny_model_dir}", f"dataset={prompts}", f"output_dir={out}",
                 f"eval_dataset={prompts}", f"retain_eval_dataset={prompts}", "eval_steps=1",
                 "reward_funcs=[exact_match]", "max_completion_length=8", "rollout_batch_size=2", "num_generations=2",
                 "per_device_train_batch_size=4", "max_steps=4", "stop_on_alarms=[truncated]", "disable_tqdm=true",
                 "plot_loss=false"]) == 0
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_retain_reward" in r]
    assert [r["step"] for r in evals] == [0, 1] and all("eval_reward" in r for r in evals)
    assert any(r.get("stopped_by_alarm/truncated") == 1 and r["step"] == 1 for r in records)
    assert max(r["step"] for r in records) == 1 and (out / "model.safetensors").exists()


def test_an_unknown_alarm_is_a_config_error(tmp_path, capsys):
    assert main(["grpo", "model_name_or_path=x", "dataset=y", f"output_dir={tmp_path}", "reward_funcs=[exact_match]",
                 "alarms={kll: 1}"]) == 2
    assert "alarms: unknown kll; known: kl, entropy_drop" in capsys.readouterr().err
    assert main(["grpo", "model_name_or_path=x", "dataset=y", f"output_dir={tmp_path}", "reward_funcs=[exact_match]",
                 "stop_on_alarms=[retain]"]) == 2
    assert "stop_on_alarms: unknown retain; known:" in capsys.readouterr().err


def test_a_run_whose_process_is_gone_reads_as_killed(tmp_path):
    from posttrain.board.runs import Runs
    from posttrain.train.reporting import MetricsLogger, _OPEN

    for name in ("live", "gone", "remote", "remote-quiet"):
        logger = MetricsLogger(tmp_path / name)
        logger.log({"step": 1, "loss": 1.0})
        _OPEN.pop(logger.status_path)  # as if another process had started it
    dead = subprocess.Popen(["true"])
    dead.wait()

    def edit_status(name, **change):
        status = json.loads((tmp_path / name / "run_status.json").read_text())
        (tmp_path / name / "run_status.json").write_text(json.dumps({**status, **change}))

    edit_status("gone", pid=dead.pid)
    edit_status("remote", host="another-node", pid=dead.pid)  # a pid there says nothing here
    edit_status("remote-quiet", host="another-node")
    old = time.time() - 2 * 3600
    os.utime(tmp_path / "remote-quiet" / "metrics.jsonl", (old, old))
    (tmp_path / "garbled").mkdir()  # a status file nobody could parse: the run still lists, by its files
    (tmp_path / "garbled" / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
    (tmp_path / "garbled" / "run_status.json").write_text("{not json")
    runs = {r["name"]: r for r in Runs(tmp_path).all()}
    assert {n: r["status"] for n, r in runs.items()} == {"live": "running", "gone": "killed", "remote": "running",
                                                         "remote-quiet": "killed", "garbled": "running"}
    assert runs["garbled"]["step"] == 1  # the half-written last line is not read yet


# ---- the API -----------------------------------------------------------------------------------

def test_api_runs_lists_every_run_with_status_and_last_metrics(board, runs_dir):
    status, body, _ = board.get("/api/runs")
    assert status == 200
    runs = {r["name"]: r for r in body["runs"]}
    assert set(runs) == {"sft", "rl/grpo", "diverged"}
    assert runs["sft"]["status"] == "finished" and runs["sft"]["stage"] == "sft" and runs["sft"]["step"] == 10
    assert runs["sft"]["headline"]["name"] == "loss" and runs["sft"]["last"]["loss"] == runs["sft"]["headline"]["value"]
    assert runs["rl/grpo"]["stage"] == "grpo" and runs["rl/grpo"]["step"] == 3 and runs["rl/grpo"]["has_rollouts"]
    assert runs["diverged"]["status"] == "failed" and "diverged" in runs["diverged"]["reason"]
    assert runs["sft"]["path"] == str((runs_dir / "sft").resolve())
    status, body, _ = board.get("/api/rollouts?run=rl/grpo&step=2")
    assert status == 200 and body["steps"] == [1, 2, 3] and len(body["rows"]) == 4
    status, body, _ = board.get("/api/config?run=sft&run=diverged")
    assert {d["key"] for d in body["diff"]} >= {"learning_rate", "output_dir", "max_steps"}
    assert "seed" not in {d["key"] for d in body["diff"]}


def test_no_path_outside_runs_dir_is_served(runs_dir, tmp_path):
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    link = runs_dir / "linked"
    link.symlink_to(outside, target_is_directory=True)
    try:
        with Board(runs_dir) as b:
            names = {r["name"] for r in b.get("/api/runs")[1]["runs"]}
            assert "linked" not in names
            for bad in ("linked", "..", "../secret", str(outside), "sft/../..", "%2e%2e/secret"):
                status, body, _ = b.get(f"/api/metrics?run={bad}")
                assert status == 404, (bad, body)
            assert b.get("/static/..%2fruns.py")[0] == 404
            assert b.get("/static/board.js")[0] == 200
    finally:
        link.unlink()


def test_an_api_key_guards_every_route(runs_dir):
    with Board(runs_dir, api_key="s3cret") as b:
        for path in ("/", "/api/runs", "/static/board.js", "/api/metrics?run=sft"):
            assert b.get(path)[0] == 401, path
        assert b.get("/api/runs", {"Authorization": "Bearer wrong"})[0] == 401
        assert b.get("/api/runs", {"Authorization": "Bearer s3cret"})[0] == 200
        status, _, headers = b.get("/?key=s3cret")  # the page's first load: the key becomes a cookie
        assert status == 200 and "posttrain_board_key=s3cret" in headers.get("set-cookie", "")
        assert b.get("/api/runs", {"Cookie": "posttrain_board_key=s3cret"})[0] == 200


def test_sft_samples_show_the_trained_spans(board):
    status, body, _ = board.get("/api/samples?run=sft&count=2")
    assert status == 200 and len(body["samples"]) == 2
    sample = body["samples"][0]
    assert "[[" in sample["text"] and "]]" in sample["text"] and 0 < sample["trained"] < sample["tokens"]


def test_chat_answers_from_a_finished_run_and_refuses_one_without_a_model(board):
    def post(payload):
        return _post(board, "/api/chat", payload)

    status, body = post({"run": "sft", "messages": [{"role": "user", "content": "reverse 123"}], "max_new_tokens": 8})
    assert status == 200 and isinstance(body["text"], str)
    status, body = post({"run": "diverged", "messages": [{"role": "user", "content": "hi"}]})
    assert status == 400 and "no final model" in body["detail"]


def test_board_command_refuses_a_missing_folder_a_busy_port_and_an_open_launcher(runs_dir, tmp_path, capsys):
    assert main(["board", str(tmp_path / "nope")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert main(["board", str(runs_dir), "--port", str(busy.getsockname()[1])]) == 2
    assert "cannot listen there" in capsys.readouterr().err
    assert main(["board", str(runs_dir), "--host", "0.0.0.0", "--allow-launch"]) == 2
    assert "--allow-launch on --host 0.0.0.0" in capsys.readouterr().err


def _post(board: Board, path: str, payload: dict) -> tuple[int, dict]:
    req = urllib.request.Request(board.url(path), data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_launching_is_off_unless_asked(board):
    status, body = _post(board, "/api/launch", {"stage": "sft", "name": "new", "config": "max_steps: 1"})
    assert status == 403 and "--allow-launch" in body["detail"]
    assert board.get("/api/launch")[1]["allowed"] is False


def test_a_run_launched_from_the_board_trains_and_shows_up(runs_dir, tmp_path):
    import yaml

    root = tmp_path / "runs"
    root.mkdir()
    config = yaml.safe_load((runs_dir / "sft" / "posttrain_config.yaml").read_text())
    config.update(max_steps=3, logging_steps=1, output_dir="/elsewhere")  # the board sets output_dir itself
    with Board(root, allow_launch=True) as b:
        status, body = _post(b, "/api/launch", {"stage": "sft", "name": "bad", "config": "learning_rat: 1e-4"})
        assert status == 400 and "learning_rat" in body["detail"] and not (root / "bad").exists()
        status, body = _post(b, "/api/launch", {"stage": "sft", "name": "../out", "config": ""})
        assert status == 400 and "run name" in body["detail"]
        status, body = _post(b, "/api/launch", {"stage": "sft", "name": "again", "config": yaml.safe_dump(config)})
        assert status == 200, body
        deadline = time.time() + 120
        while True:
            runs = {r["name"]: r for r in b.get("/api/runs")[1]["runs"]}
            if runs.get("again", {}).get("status") in ("finished", "failed", "killed"):
                break
            assert time.time() < deadline, Path(body["log"]).read_text()[-2000:]
            time.sleep(0.5)
    assert runs["again"]["status"] == "finished" and runs["again"]["step"] == 3, Path(body["log"]).read_text()[-2000:]
    assert (root / "again" / "model.safetensors").is_file()


# ---- the page, in a real browser ---------------------------------------------------------------

@needs_chromium
def test_page_lists_runs_and_draws_curves_from_metrics(board, runs_dir, tmp_path):
    dom = chromium(board.url("/?run=sft"), tmp_path)
    for name in ("sft", "rl/grpo", "diverged"):
        assert f'data-run="{name}"' in dom
    assert 'class="status failed"' in dom and 'class="status finished"' in dom
    losses = [r for r in map(json.loads, (runs_dir / "sft" / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert f'data-metric="loss" data-points="{len(losses)}" data-last-x="{losses[-1]["step"]}"' in dom
    assert "<canvas" in dom  # uPlot drew it


@needs_chromium
def test_page_shows_the_rollout_table_of_a_grpo_run(board, runs_dir, tmp_path):
    dom = chromium(board.url("/?run=rl/grpo&tab=rollouts"), tmp_path)
    last = [r for r in map(json.loads, (runs_dir / "rl" / "grpo" / "rollouts.jsonl").read_text().splitlines())
            if r["step"] == 3]
    assert "4 of 4 completions at step 3" in dom
    for header in ("prompt", "completion", "length", "exact_match", "total", "advantage", "truncated"):
        assert f">{header}</th>" in dom
    for r in last:
        assert html.escape(r["prompt"], quote=False) in dom


@needs_chromium
def test_page_updates_live_while_a_run_writes(runs_dir, tmp_path):
    from posttrain.train.reporting import MetricsLogger, _OPEN

    root = tmp_path / "runs"
    logger = MetricsLogger(root / "live")
    for step in (1, 2, 3):
        logger.log({"step": step, "loss": 2.0 / step})
    served = {"metrics": 0}

    async def writer(request, call_next):
        # The run writes more while the page is open: after the page has drawn its first curves.
        if request.url.path == "/api/runs" and served["metrics"] == 1:
            for step in (4, 5, 6):
                logger.log({"step": step, "loss": 2.0 / step})
            served["metrics"] += 1
        response = await call_next(request)
        if request.url.path == "/api/metrics":
            served["metrics"] += 1
        return response

    with Board(root, middleware=writer) as b:
        dom = chromium(b.url("/?run=live&poll=500"), tmp_path, budget_ms=6000)
    _OPEN.pop(logger.status_path)
    assert 'data-steps-seen="3,6"' in dom  # drew step 3, then step 6, without a reload
    assert 'data-metric="loss" data-points="6"' in dom
    assert 'class="status running"' in dom


@needs_chromium
def test_page_overlays_chosen_and_rejected_rewards_of_a_preference_run(tmp_path):
    from posttrain.train.reporting import MetricsLogger

    run = tmp_path / "runs" / "dpo"
    logger = MetricsLogger(run)
    for step in range(1, 6):  # the keys `posttrain dpo` logs
        logger.log({"step": step, "loss": 0.7 - step / 20, "rewards/chosen": step / 10, "rewards/rejected": -step / 10,
                    "rewards/margin": step / 5, "rewards/accuracy": 0.5 + step / 20})
    logger.close()
    (run / "posttrain_config.yaml").write_text("stage: dpo\nmodel_name_or_path: base\n")
    with Board(tmp_path / "runs") as b:
        dom = chromium(b.url("/?run=dpo"), tmp_path)
    assert 'data-metric="rewards/chosen vs rewards/rejected" data-points="10"' in dom
    assert 'data-metric="rewards/margin" data-points="5"' in dom
    assert "rewards/accuracy 0.7500" in dom  # the stage's headline figure in the runs list


@needs_chromium
def test_screenshot_is_not_blank(board, tmp_path):
    from PIL import Image

    shot = tmp_path / "board.png"
    chromium(board.url("/?run=rl/grpo"), tmp_path, f"--screenshot={shot}")
    image = Image.open(shot).convert("RGB")
    assert image.size == (1400, 1000)
    colors = image.getcolors(maxcolors=1 << 20)
    assert len(colors) > 50  # text, badges and curves, not one flat fill
    assert max(count for count, _ in colors) < 0.9 * 1400 * 1000
