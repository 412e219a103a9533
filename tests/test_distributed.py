"""The same command under torchrun: 2 CPU processes (gloo) match one process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import sft_overrides

SRC = str(Path(__file__).resolve().parents[1] / "src")


def test_two_processes_match_one(tiny_model_dir, task_data, tmp_path):
    env = dict(os.environ, PYTHONPATH=SRC, OMP_NUM_THREADS="1")
    common = dict(max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3, save_steps=2)
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, "-m", "posttrain", "sft",
                    *sft_overrides(tiny_model_dir, task_data, one, gradient_accumulation_steps=2, **common)],
                   env=env, check=True, capture_output=True)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "posttrain", "sft",
                          *sft_overrides(tiny_model_dir, task_data, two, gradient_accumulation_steps=1, **common)],
                         env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=2e-5)
    # Only rank 0 wrote: one metrics line per logging step, one checkpoint folder per save.
    lines = (two / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len((one / "metrics.jsonl").read_text().splitlines())
    assert sorted(p.name for p in two.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-2"]
