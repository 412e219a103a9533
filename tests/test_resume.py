"""A run killed with SIGKILL mid-training and resumed ends with the same weights as one never stopped."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from conftest import sft_overrides
from child_env import child_env


def _cmd(overrides):
    return [sys.executable, "-m", "posttrain", "sft", *overrides]


def _env():
    return child_env()


def test_sigkill_then_resume_matches_uninterrupted(tiny_model_dir, task_data, tmp_path):
    settings = dict(max_steps=60, save_steps=10, save_total_limit=2, lr_scheduler_type="cosine", warmup_ratio=0.1,
                    per_device_train_batch_size=4, gradient_accumulation_steps=2)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(_cmd(sft_overrides(tiny_model_dir, task_data, straight, **settings)), env=_env(), check=True,
                   capture_output=True)

    proc = subprocess.Popen(_cmd(sft_overrides(tiny_model_dir, task_data, killed, **settings)), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "checkpoint-20").exists() and time.time() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "the run finished before it could be killed; make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "model.safetensors").exists()  # no final model from a killed run
    left = sorted(p.name for p in killed.iterdir() if p.name.startswith("checkpoint-"))
    assert left and all((killed / p / "trainer_state.json").exists() for p in left)  # only whole checkpoints

    subprocess.run(_cmd(sft_overrides(tiny_model_dir, task_data, killed, resume_from_checkpoint="auto", **settings)),
                   env=_env(), check=True, capture_output=True)
    a, b = load_file(straight / "model.safetensors"), load_file(killed / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    # metrics.jsonl tells one continuous story: each logged step once.
    steps = [json.loads(l)["step"] for l in (killed / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert steps == list(range(5, 61, 5))
    # Only the newest save_total_limit checkpoints are kept.
    assert len([p for p in killed.iterdir() if p.name.startswith("checkpoint-")]) <= 2
