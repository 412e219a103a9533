"""GRPO under torchrun: 2 CPU processes (gloo) match one process with the same global batch.

Each completion is sampled from a seed set by (step, prompt, index in its group), not by its row or
process, so both layouts draw the same completions; the loss is divided by the tokens of the whole
step over both ranks and the gradients are summed, so the weights after each step agree too.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain.data.synthetic import split_task, write_jsonl

from child_env import child_env

# Varied, deterministic rewards from an untrained model's text, so every group has advantages to follow.
REWARD = "def length_mod(prompts, completions, **kw):\n    return [float(len(c) % 5) for c in completions]\n"


def _grpo(model, prompts, reward, out, procs: int, prompts_per_proc: int, stage: str = "grpo", **extra) -> list[dict]:
    env = child_env()
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] \
        if procs > 1 else [sys.executable]
    args = dict(model_name_or_path=model, dataset=prompts, output_dir=out, reward_funcs=f"[{reward}:length_mod]",
                rollout_batch_size=prompts_per_proc, num_generations=4, per_device_train_batch_size=4 * prompts_per_proc,
                max_completion_length=8, kl_coef=0.05, learning_rate=1e-3, max_steps=3, disable_tqdm=True,
                plot_loss=False, seed=0, **extra)
    res = subprocess.run([*launch, "-m", "posttrain", stage, *[f"{k}={v}" for k, v in args.items()]],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def grpo_task(tmp_path: Path) -> tuple[Path, Path]:
    """32 prompts of the embedded task and the REWARD file, written under tmp_path."""
    train, _ = split_task(32, 0, seed=3)
    prompts = write_jsonl([{"prompt": r["messages"][0]["content"], "answer": r["answer"]} for r in train],
                          tmp_path / "prompts.jsonl")
    reward = tmp_path / "reward.py"
    reward.write_text(REWARD)
    return prompts, reward


@pytest.mark.parametrize("sharding", [{}, {"fsdp": "full_shard"}], ids=["ddp", "fsdp"])
def test_two_processes_match_one(sharding, tiny_model_dir, tmp_path):
    prompts, reward = grpo_task(tmp_path)
    one = _grpo(tiny_model_dir, prompts, reward, tmp_path / "one", procs=1, prompts_per_proc=4)
    two = _grpo(tiny_model_dir, prompts, reward, tmp_path / "two", procs=2, prompts_per_proc=2, **sharding)
    steps_one = [r for r in one if "reward_mean" in r]
    steps_two = [r for r in two if "reward_mean" in r]
    assert len(steps_one) == len(steps_two) == 3  # rank 0 alone writes the log
    for a, b in zip(steps_one, steps_two):  # the same completions, scored the same
        assert a["reward_mean"] == b["reward_mean"] and a["response_length"] == b["response_length"]
        assert abs(a["kl"] - b["kl"]) < 1e-5
    assert any(r["reward_std"] > 0 for r in steps_one)  # the groups had something to learn from
    start = load_file(Path(tiny_model_dir) / "model.safetensors")
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    moved = max((a[k] - start[k]).abs().max().item() for k in a)
    assert moved > 1e-3  # the steps changed the weights...
    # ...and both layouts changed them the same way (FSDP2 runs each prompt with its response, not once per
    # group, and reduces gradients in another order: float rounding apart)
    atol = 5e-5 if sharding else 2e-5
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol)


def test_two_processes_evaluate_fewer_prompts_than_ranks(tiny_model_dir, tmp_path):
    """The rank with no held-out prompt still takes part in the evaluation's reduction (it used to skip it, and
    the other rank waited for it for ever)."""
    prompts, reward = grpo_task(tmp_path)
    held = write_jsonl([{"prompt": "reverse 12", "answer": "21"}], tmp_path / "held.jsonl")
    records = _grpo(tiny_model_dir, prompts, reward, tmp_path / "two", procs=2, prompts_per_proc=2,
                    eval_dataset=held, eval_steps=1)
    evals = [r for r in records if "eval_reward" in r]
    assert len(evals) == 4 and all(r["eval_response_length"] > 0 for r in evals)  # steps 0-3
