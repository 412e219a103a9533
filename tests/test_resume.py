"""A run killed with SIGKILL mid-training and resumed ends with the same weights as one never stopped; in
every mode (SFT full / LoRA / PiSSA / prompt tuning, DPO, RM, PPO, GRPO) the same seed gives the same weights
and a run resumed from its checkpoint ends where the straight one did; a broken newest checkpoint is skipped,
a named one refused; leftovers of killed runs are removed; checkpoints reach the disk before they count."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch
from inference_fixtures import one_torch_thread  # noqa: F401  (autouse: tiny models run single-threaded)
from safetensors.torch import load_file

from posttrain.cli import main

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


# -- every mode: the same seed gives the same weights, and a resumed run ends where the straight one did --

def _pairs(root):
    from posttrain.data.synthetic import preference_pairs, split_task, write_jsonl

    train, _ = split_task(16, 0, seed=3)
    return write_jsonl(preference_pairs(train, seed=0), root / "pairs.jsonl")


def _prompts(root):
    from posttrain.data.synthetic import split_task, write_jsonl

    train, _ = split_task(16, 0, seed=7)
    return write_jsonl([{"prompt": r["messages"][0]["content"]} for r in train], root / "prompts.jsonl")


LORA = dict(finetuning_type="lora", lora_rank=4, lora_dropout=0.1)
RL = dict(reward_funcs="[format:1.*]", max_completion_length=4, rollout_batch_size=2, num_generations=2)
# mode: (command, its data, its settings). Each run is 4 optimizer steps with a checkpoint after step 2.
MODES = {
    "full": ("sft", "sft", {}),
    "lora": ("sft", "sft", LORA),
    "pissa": ("sft", "sft", dict(LORA, pissa_init=True, pissa_iter=2)),
    "prompt_tuning": ("sft", "sft", dict(finetuning_type="prompt_tuning", num_virtual_tokens=2)),
    "dpo_lora": ("dpo", "pairs", LORA),
    "rm": ("rm", "pairs", {}),
    "ppo": ("ppo", "prompts", dict(RL, per_device_train_batch_size=2, ppo_epochs=2, critic_learning_rate=1e-3)),
    "grpo": ("grpo", "prompts", dict(RL, per_device_train_batch_size=4)),
}


@pytest.fixture(scope="module")
def mode_data(task_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("modes")
    return {"sft": task_data, "pairs": _pairs(root), "prompts": _prompts(root)}


def _mode_args(mode, model_dir, data, out, **extra) -> dict:
    command, which, settings = MODES[mode]
    args = dict(model_name_or_path=model_dir, dataset=data[which], output_dir=out, learning_rate=1e-3,
                per_device_train_batch_size=4, max_steps=4, save_steps=2, logging_steps=1, cutoff_len=48,
                disable_tqdm=True, plot_loss=False, lr_scheduler_type="cosine", seed=3)
    args.update(settings)
    if command == "dpo":
        args["ref_cache_dir"] = out.parent / "ref-cache"
    args.update(extra)
    return args


def _run_mode(mode, model_dir, data, out, **extra):
    assert main([MODES[mode][0], *_overrides(_mode_args(mode, model_dir, data, out, **extra))]) == 0
    return _weights(out)


def _overrides(args: dict) -> list[str]:
    return [f"{k}={v}" for k, v in args.items()]


def _weights(out) -> dict[str, torch.Tensor]:
    return {f"{f.name}/{k}": v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}


def _assert_same(a: dict, b: dict) -> None:
    assert a and a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, e.g. {differ[:3]}"


@pytest.fixture(scope="module")
def straight_runs(tiny_model_dir, mode_data, tmp_path_factory):
    """One uninterrupted run per mode, made on first use and shared by the tests below."""
    root, done = tmp_path_factory.mktemp("straight"), {}

    def get(mode):
        if mode not in done:
            torch.manual_seed(1234)  # whatever state the RNG is left in before a run, the seed must decide
            done[mode] = root / mode, _run_mode(mode, tiny_model_dir, mode_data, root / mode)
        return done[mode]
    return get


@pytest.mark.parametrize("mode", list(MODES))
def test_the_same_config_twice_gives_the_same_weights(mode, straight_runs, tiny_model_dir, mode_data, tmp_path):
    _, first = straight_runs(mode)
    torch.manual_seed(98765)  # another RNG state before the run, as a new process would have
    _assert_same(first, _run_mode(mode, tiny_model_dir, mode_data, tmp_path / "again"))


@pytest.mark.parametrize("mode", list(MODES))
def test_resumed_run_ends_with_the_weights_of_the_uninterrupted_one(mode, straight_runs, tiny_model_dir, mode_data,
                                                                    tmp_path, caplog):
    out, straight = straight_runs(mode)
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")  # as if killed after step 2's checkpoint
    torch.manual_seed(98765)
    with caplog.at_level(logging.INFO):
        _assert_same(straight, _run_mode(mode, tiny_model_dir, mode_data, resumed, resume_from_checkpoint="auto"))
    assert f"resumed from {resumed / 'checkpoint-2'} (step 2 of 4)" in caplog.text


def test_pissa_resumed_in_a_new_process_ends_with_the_weights_of_the_uninterrupted_run(straight_runs, tiny_model_dir,
                                                                                    mode_data, tmp_path):
    """A new process starts with another RNG state: the randomized SVD that splits PiSSA's frozen residual
    base off the weights must still give the base the checkpointed adapter was trained on."""
    out, straight = straight_runs("pissa")
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    args = _mode_args("pissa", tiny_model_dir, mode_data, resumed, resume_from_checkpoint="auto")
    subprocess.run(_cmd(_overrides(args)), env=_env(), check=True, capture_output=True)
    _assert_same(straight, _weights(resumed))


# -- broken checkpoints and leftovers of killed runs -------------------------------------------------

def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


BREAKS = {
    "model.safetensors is unreadable": lambda c: _truncate(c / "model.safetensors"),
    "trainer_state.json is not valid JSON": lambda c: (c / "trainer_state.json").write_text('{"step": 3, "epo'),
    "optimizer.pt is missing": lambda c: (c / "optimizer.pt").unlink(),
    "rng.pt is cut short": lambda c: _truncate(c / "rng.pt"),
}


@pytest.mark.parametrize("problem", list(BREAKS))
def test_auto_resume_skips_a_broken_newest_checkpoint_and_says_why(problem, straight_runs, tiny_model_dir, mode_data,
                                                                   tmp_path, caplog):
    out, straight = straight_runs("full")
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    broken = resumed / "checkpoint-3"  # a newer one, damaged (a crash before its files reached the disk)
    shutil.copytree(out / "checkpoint-2", broken)
    BREAKS[problem](broken)
    with caplog.at_level(logging.INFO):
        _assert_same(straight, _run_mode("full", tiny_model_dir, mode_data, resumed, resume_from_checkpoint="auto"))
    assert f"skips {broken}: {problem}" in caplog.text
    assert f"resumed from {resumed / 'checkpoint-2'} (step 2 of 4)" in caplog.text


def test_a_named_broken_checkpoint_is_a_clear_error(straight_runs, tiny_model_dir, mode_data, tmp_path, capsys):
    out, _ = straight_runs("full")
    broken = tmp_path / "checkpoint-2"
    shutil.copytree(out / "checkpoint-2", broken)
    _truncate(broken / "model.safetensors")
    code = main(["sft", f"model_name_or_path={tiny_model_dir}", f"dataset={mode_data['sft']}", "max_steps=4",
                 f"output_dir={tmp_path / 'out'}", f"resume_from_checkpoint={broken}", "disable_tqdm=true"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"error: resume_from_checkpoint: '{broken}' is not a whole checkpoint: model.safetensors is unreadable" \
        in err


def test_leftovers_of_killed_runs_are_removed_and_nothing_else(straight_runs, tiny_model_dir, mode_data, tmp_path):
    out, _ = straight_runs("full")
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    leftovers = [".tmp-checkpoint-4-77", ".tmp-final-77", ".pissa-init-77/pissa_init"]
    for name in leftovers:
        (resumed / name).mkdir(parents=True)
        (resumed / name / "file").write_text("x")
    _run_mode("full", tiny_model_dir, mode_data, resumed, resume_from_checkpoint="auto")
    assert not any((resumed / n).exists() for n in leftovers)
    # A folder that also holds names posttrain does not write is refused before anything runs
    # (tests/test_bad_inputs.py), so the clean-up never meets one.


def test_pissa_keeps_its_initial_adapter_in_the_output_folder_and_removes_it(straight_runs, tiny_model_dir,
                                                                            mode_data, tmp_path, monkeypatch):
    out, _ = straight_runs("pissa")
    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    broken = tmp_path / "broken"
    shutil.copytree(out / "checkpoint-2", broken)
    (broken / "optimizer.pt").unlink()
    run = tmp_path / "run"
    args = _mode_args("pissa", tiny_model_dir, mode_data, run, resume_from_checkpoint=broken)
    assert main(["sft", *_overrides(args)]) == 2  # stops after the initial adapter was written
    assert not list(system_tmp.iterdir()) and not list(run.glob(".pissa-init-*"))


def test_checkpoints_and_the_final_model_are_flushed_to_disk(tiny_model_dir, task_data, tmp_path, monkeypatch):
    flushed = []
    real_fsync = os.fsync

    def fsync(fd):  # which file or folder each fsync flushed
        flushed.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    out = tmp_path / "out"
    assert main(["sft", *sft_overrides(tiny_model_dir, task_data, out, max_steps=2, save_steps=1)]) == 0
    for name in ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "trainer_state.json"):
        assert any(f.startswith(str(out / ".tmp-checkpoint-1-")) and f.endswith(name) for f in flushed), name
    assert any(f.startswith(str(out / ".tmp-final-")) and f.endswith("model.safetensors") for f in flushed)
    assert flushed.count(str(out)) >= 2  # the folder holding the renamed checkpoint, and the final files


def test_a_broken_checkpoint_above_the_run_does_not_push_its_checkpoints_out(tmp_path):
    from posttrain.train import checkpoint

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    (tmp_path / "checkpoint-9").mkdir()  # a stopped run's newest, broken: resumed from an older one
    for step in (2, 4):
        checkpoint.save_checkpoint(tmp_path, step, model_state=dict(model.named_parameters()),
                                   optimizer_state=optimizer.state_dict(),
                                   scheduler=scheduler, trainer_state={}, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4", "checkpoint-9"]
    assert checkpoint.resolve_resume("auto", tmp_path) == tmp_path / "checkpoint-4"
