"""Sharded training under torchrun on 2 CPU processes (gloo): FSDP2 (`fsdp: full_shard`) and DeepSpeed
ZeRO (`deepspeed: ds_config.json`) give the losses and weights of one process with the same global batch,
each rank holds about half the parameters, a run resumed from a sharded checkpoint ends where an
uninterrupted one did (also on another process count, FSDP2), and the output is a plain HF folder or PEFT
adapter. The first DeepSpeed run on a machine compiles DeepSpeed's CPU communication op (about a minute,
then cached under ~/.cache/torch_extensions)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import sft_overrides
from child_env import child_env

ZERO = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto", "zero_allow_untested_optimizer": True, "bf16": {"enabled": "auto"},
        "zero_optimization": {"stage": 3, "overlap_comm": False, "reduce_bucket_size": "auto",
                              "stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto",
                              "stage3_gather_16bit_weights_on_model_save": True}}
COMMON = dict(max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3, save_steps=2, logging_steps=1,
              plot_loss=False)


def _run(command: str, overrides: list[str], procs: int) -> subprocess.CompletedProcess:
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] \
        if procs > 1 else [sys.executable]
    res = subprocess.run([*launch, "-m", "posttrain", command, *overrides], env=child_env(), capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in _records(out) if "loss" in r]


def _assert_same_weights(a: Path, b: Path, name: str, atol: float) -> None:
    x, y = load_file(a / name), load_file(b / name)
    assert set(x) == set(y)
    for k in x:
        torch.testing.assert_close(x[k], y[k], rtol=0, atol=atol)


def _assert_rank1_held_half(record: dict) -> None:
    """FSDP2's low-memory load: rank 0 read the whole model; rank 1 built it on the meta device and only ever held
    its half of the weights (the most weight bytes it held at once while loading and sharding, as the run measured
    them). The tolerance, 2% of the model, covers the buffers every rank keeps whole (rotary `inv_freq`: a few
    hundred bytes); a rank that loaded the whole model would be 50% over."""
    whole = record["total_params"] * 4  # fp32, every parameter (adapters too) counted once
    rank0, rank1 = record["load_bytes_per_rank"]
    assert rank0 >= whole
    assert abs(rank1 - whole / 2) <= 0.02 * whole, (rank1, whole)


@pytest.fixture(scope="module")
def zero3_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ds") / "ds_z3_config.json"
    path.write_text(json.dumps(ZERO))
    return path


@pytest.fixture(scope="module")
def one_process(tiny_model_dir, task_data, tmp_path_factory) -> Path:
    """The reference: one process, 2 micro-batches of 4 per step (the global batch of 2 ranks x 4)."""
    out = tmp_path_factory.mktemp("one") / "run"
    _run("sft", sft_overrides(tiny_model_dir, task_data, out, gradient_accumulation_steps=2, **COMMON), 1)
    return out


@pytest.mark.parametrize("sharding", ["fsdp=full_shard", "deepspeed"])
def test_two_sharded_processes_match_one_and_hold_half(sharding, tiny_model_dir, task_data, tmp_path, one_process,
                                                       zero3_config):
    key = f"deepspeed={zero3_config}" if sharding == "deepspeed" else sharding
    out = tmp_path / "two"
    _run("sft", [*sft_overrides(tiny_model_dir, task_data, out, **COMMON), key], 2)
    assert _losses(out) == pytest.approx(_losses(one_process), abs=1e-5)
    _assert_same_weights(one_process, out, "model.safetensors", atol=2e-5)  # a plain HF folder, tied head once
    first = _records(out)[0]
    assert first["parallel"].startswith("FSDP2 full_shard" if sharding != "deepspeed" else "DeepSpeed ZeRO-3")
    if sharding != "deepspeed":
        _assert_rank1_held_half(first)
    assert 0.45 < first["rank0_params"] / first["total_params"] < 0.55  # measured on rank 0 after sharding
    # The checkpoint a sharded run writes is whole: it resumes to the same weights as the uninterrupted run.
    straight = tmp_path / "straight.safetensors"
    shutil.copy(out / "model.safetensors", straight)
    (out / "model.safetensors").unlink()
    _run("sft", [*sft_overrides(tiny_model_dir, task_data, out, resume_from_checkpoint="auto", **COMMON), key], 2)
    resumed = load_file(out / "model.safetensors")
    for k, v in load_file(straight).items():
        torch.testing.assert_close(resumed[k], v, rtol=0, atol=0)


def test_fsdp_lora_with_offload_matches_one_process_and_resumes_on_one(tiny_model_dir, task_data, tmp_path):
    lora = dict(COMMON, finetuning_type="lora")
    one, two = tmp_path / "one", tmp_path / "two"
    _run("sft", sft_overrides(tiny_model_dir, task_data, one, gradient_accumulation_steps=2, **lora), 1)
    _run("sft", [*sft_overrides(tiny_model_dir, task_data, two, **lora), "fsdp=full_shard offload"], 2)
    _assert_same_weights(one, two, "adapter_model.safetensors", atol=1e-6)
    # The new LoRA weights are rank 0's on both ranks (broadcast with the base), as one process draws them.
    _assert_rank1_held_half(_records(two)[0])
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), two)  # plain PEFT
    assert model(torch.tensor([[1, 2, 3]])).logits.isfinite().all()
    # A 2-process FSDP2 checkpoint resumed by one process (2 micro-batches: the same global batch).
    (two / "adapter_model.safetensors").unlink()
    _run("sft", sft_overrides(tiny_model_dir, task_data, two, gradient_accumulation_steps=2,
                              resume_from_checkpoint="auto", **lora), 1)
    _assert_same_weights(one, two, "adapter_model.safetensors", atol=1e-6)


@pytest.mark.parametrize("command", ["dpo", "kto"])
def test_fsdp_preference_stages_match_one_process(command, tiny_model_dir, tmp_path):
    """The reference log-probs are filled in before sharding; KTO's whole-step KL estimate runs through the
    sharded model outside its forward."""
    from posttrain.data.synthetic import preference_pairs, split_task, write_jsonl
    data = write_jsonl(preference_pairs(split_task(16, 0, seed=3)[0], seed=0), tmp_path / "pairs.jsonl")
    common = dict(model_name_or_path=tiny_model_dir, dataset=data, max_steps=3, per_device_train_batch_size=2,
                  learning_rate=1e-3, logging_steps=1, save_steps=0, cutoff_len=64, disable_tqdm=True, seed=0,
                  plot_loss=False, lr_scheduler_type="constant")
    args = lambda out, **kw: [f"{k}={v}" for k, v in dict(common, output_dir=out, **kw).items()]  # noqa: E731
    _run(command, args(tmp_path / "one", gradient_accumulation_steps=2), 1)
    _run(command, [*args(tmp_path / "two"), "fsdp=full_shard"], 2)
    a, b = _records(tmp_path / "one"), _records(tmp_path / "two")
    assert [r["loss"] for r in a if "loss" in r] == pytest.approx([r["loss"] for r in b if "loss" in r], abs=1e-5)
    _assert_same_weights(tmp_path / "one", tmp_path / "two", "model.safetensors", atol=2e-5)


@pytest.mark.parametrize("overrides, message", [
    (["fsdp=full_shard", "deepspeed={ds}"], "fsdp and deepspeed are both set"),
    (["fsdp=zero_shard"], "not a sharding strategy"),
    (["fsdp=full_shard sideways"], "'sideways' is not understood"),
    (["fsdp=no_shard offload"], "nothing to offload"),
    (["fsdp_config={{cpu_offload: true}}"], "fsdp_config is set but fsdp is not"),
    (["fsdp=full_shard", "fsdp_config={{limit_all_gathers: true}}"], "'limit_all_gathers' is not a key"),
    (["fsdp=full_shard", "fsdp_config={{fsdp_version: 1}}"], "fsdp_version 1 is not supported"),
    (["deepspeed={bad}"], "zero_optimization.stage3_prefetch_bucket: Extra inputs are not permitted"),
    (["deepspeed={missing}"], "does not exist"),
    (["fsdp=full_shard", "finetuning_type=prefix_tuning"], "prefix_tuning cannot be sharded with fsdp yet"),
])
def test_conflicting_or_unknown_sharding_keys_are_refused_before_loading(overrides, message, tiny_model_dir,
                                                                         task_data, tmp_path, capsys):
    from posttrain.cli import main
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_prefetch_bucket": 10}}))
    good = tmp_path / "good.json"
    good.write_text(json.dumps(ZERO))
    filled = [o.format(ds=good, bad=bad, missing=tmp_path / "nope.json") for o in overrides]
    code = main(["sft", *sft_overrides(tiny_model_dir, task_data, tmp_path / "out"), *filled])
    err = capsys.readouterr().err
    assert code != 0 and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # refused before the output folder was touched


def test_fsdp_reward_model_matches_one_process(tiny_model_dir, tmp_path):
    """The reward statistics are scored on every rank through the sharded model; the saved reward model is
    merged and whole. Three held-out pairs over two ranks, one a batch: rank 1 runs a second, dropped forward
    beside rank 0's second batch (the sharded forward gathers weights with it), and the figures are one process's."""
    from posttrain.data.synthetic import preference_pairs, split_task, write_jsonl
    train, held = split_task(16, 3, seed=3)
    data = write_jsonl(preference_pairs(train, seed=0), tmp_path / "pairs.jsonl")
    held = write_jsonl(preference_pairs(held, seed=1), tmp_path / "held.jsonl")
    common = dict(model_name_or_path=tiny_model_dir, dataset=data, max_steps=3, per_device_train_batch_size=2,
                  learning_rate=1e-3, logging_steps=1, save_steps=0, cutoff_len=64, disable_tqdm=True, seed=0,
                  plot_loss=False, finetuning_type="lora", eval_dataset=held, eval_steps=3,
                  per_device_eval_batch_size=1)
    args = lambda out, **kw: [f"{k}={v}" for k, v in dict(common, output_dir=out, **kw).items()]  # noqa: E731
    _run("rm", args(tmp_path / "one", gradient_accumulation_steps=2), 1)
    _run("rm", [*args(tmp_path / "two"), "fsdp=full_shard"], 2)
    _assert_same_weights(tmp_path / "one", tmp_path / "two", "model.safetensors", atol=2e-5)
    _assert_rank1_held_half(_records(tmp_path / "two")[0])  # the new head is rank 0's on both ranks
    stats = [json.loads((tmp_path / p / "config.json").read_text())["reward_mean"] for p in ("one", "two")]
    assert stats[0] == pytest.approx(stats[1], abs=1e-5)
    evals = [[r for r in _records(tmp_path / p) if "eval_loss" in r][-1] for p in ("one", "two")]
    assert evals[0].keys() == evals[1].keys() and "eval_accuracy" in evals[0]
    assert all(evals[0][k] == pytest.approx(evals[1][k], abs=1e-4) for k in evals[0] if k.startswith("eval_"))


@pytest.mark.parametrize("sharding", ["fsdp", "deepspeed"])
def test_sharded_ppo_with_critic_matches_one_process_and_resumes(sharding, tiny_model_dir, tmp_path, zero3_config):
    from posttrain.data.synthetic import split_task, write_jsonl
    train, _ = split_task(16, 0, seed=7)
    data = write_jsonl([{"prompt": r["messages"][0]["content"]} for r in train], tmp_path / "prompts.jsonl")
    common = dict(model_name_or_path=tiny_model_dir, dataset=data, reward_funcs="[format:1.*]", max_steps=4,
                  max_completion_length=4, num_generations=2, learning_rate=1e-3, critic_learning_rate=1e-3,
                  logging_steps=1, save_steps=2, cutoff_len=48, disable_tqdm=True, seed=3, plot_loss=False)
    args = lambda out, **kw: [f"{k}={v}" for k, v in dict(common, output_dir=out, **kw).items()]  # noqa: E731
    _run("ppo", args(tmp_path / "one", rollout_batch_size=4, per_device_train_batch_size=8), 1)
    two = args(tmp_path / "two", rollout_batch_size=2, per_device_train_batch_size=4)
    key = f"deepspeed={zero3_config}" if sharding == "deepspeed" else "fsdp=full_shard"
    res = _run("ppo", [*two, key], 2)
    if sharding == "fsdp":  # the rollout copy is a whole actor on every rank: no low-memory load, and the log says so
        assert "the model loads whole on every rank (RL keeps a whole rollout copy" in res.stderr
    a, b = _records(tmp_path / "one"), _records(tmp_path / "two")
    assert [r["reward_mean"] for r in a if "reward_mean" in r] == [r["reward_mean"] for r in b if "reward_mean" in r]
    _assert_same_weights(tmp_path / "one", tmp_path / "two", "model.safetensors", atol=5e-5)
    assert b[0]["parallel"].startswith("FSDP2" if sharding == "fsdp" else "DeepSpeed ZeRO-3")
    straight = load_file(tmp_path / "two" / "model.safetensors")
    (tmp_path / "two" / "model.safetensors").unlink()
    _run("ppo", [*two, key, "resume_from_checkpoint=auto"], 2)
    for k, v in load_file(tmp_path / "two" / "model.safetensors").items():
        torch.testing.assert_close(v, straight[k], rtol=0, atol=0)


@pytest.mark.parametrize("strategy", ["shard_grad_op", "hybrid_shard", "no_shard"])
def test_every_fsdp_strategy_matches_one_process(strategy, tiny_model_dir, task_data, tmp_path, one_process):
    """shard_grad_op keeps the gathered weights between forward and backward; hybrid_shard shards within a
    node and replicates across nodes (one node here); no_shard is DDP."""
    out = tmp_path / "two"
    _run("sft", [*sft_overrides(tiny_model_dir, task_data, out, **dict(COMMON, save_steps=0)), f"fsdp={strategy}"], 2)
    assert _losses(out) == pytest.approx(_losses(one_process), abs=1e-5)
    first = _records(out)[0]
    held = first["rank0_params"] / first["total_params"]
    assert held == 1.0 if strategy == "no_shard" else 0.45 < held < 0.55
