"""The same command under torchrun: 2 CPU processes (gloo) match one process with the same global batch."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from safetensors.torch import load_file

from conftest import sft_overrides
from child_env import child_env


def test_two_processes_match_one(tiny_model_dir, task_data, tmp_path):
    env = child_env()
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


def test_kto_kl_reference_point_spans_the_whole_step_and_every_rank(tiny_model_dir, tmp_path):
    """KTO's z0 is one estimate over the global batch: 2 processes x 2 micro-batches of 2 rows train
    exactly as one process with one batch of 8 (a per-micro-batch z0 would not). 20 rows: the last
    batch of each epoch is partial."""
    from posttrain.data.synthetic import preference_pairs, split_task, write_jsonl

    pairs = preference_pairs(split_task(16, 0, seed=3)[0], seed=0)
    # Mostly desirable rows: training lifts answers of this form in general, mismatched ones too, so
    # z0 = max(0, mean r(x, y')) leaves zero within a few steps.
    rows = [{"prompt": p["prompt"], "completion": p["chosen"], "label": True} for p in pairs]
    rows += [{"prompt": p["prompt"], "completion": p["rejected"], "label": False} for p in pairs[::4]]
    data = write_jsonl(rows, tmp_path / "kto.jsonl")
    env = child_env()

    def args(out, **extra):
        return ["kto", *sft_overrides(tiny_model_dir, data, out, max_steps=4, logging_steps=1, learning_rate=5e-3,
                                      pref_beta=0.5, ref_cache_dir=tmp_path / "cache", save_steps=0, **extra)]

    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, "-m", "posttrain", *args(one, per_device_train_batch_size=8)],
                   env=env, check=True, capture_output=True)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "posttrain", *args(two, per_device_train_batch_size=2, gradient_accumulation_steps=2)],
                         env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    kl = [json.loads(line).get("kl") for line in (one / "metrics.jsonl").read_text().splitlines()]
    assert any(k for k in kl if k)  # z0 moved off zero: the test exercises it
    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    # Measured: 3e-5 apart (float sums in another order, through Adam); a z0 per micro-batch: 1.6e-2.
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=2e-4)


def test_bco_running_mean_is_shared_by_every_rank(tiny_model_dir, tmp_path):
    """BCO's δ is the mean reward of the earlier steps over every rank, and the filler pass of a rank
    with no pair left in the partial last batch (9 pairs, global batch 4) adds nothing: 2 processes
    match one process accumulating 2 micro-batches (a δ updated per micro-batch would not)."""
    from posttrain.data.synthetic import preference_pairs, split_task, write_jsonl

    data = write_jsonl(preference_pairs(split_task(9, 0, seed=3)[0], seed=0), tmp_path / "pairs.jsonl")
    env = child_env()

    def args(out, **extra):
        return ["dpo", *sft_overrides(tiny_model_dir, data, out, max_steps=3, logging_steps=1, learning_rate=5e-3,
                                      pref_loss="bco_pair", ref_cache_dir=tmp_path / "cache", save_steps=0,
                                      per_device_train_batch_size=2, **extra)]

    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, "-m", "posttrain", *args(one, gradient_accumulation_steps=2)],
                   env=env, check=True, capture_output=True)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "posttrain", *args(two)], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=2e-4)
