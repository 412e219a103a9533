"""RL end to end on the embedded digit task, from a briefly fine-tuned tiny model: reward rises."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file

from posttrain.cli import main
from posttrain.config import load_config
from posttrain.data.synthetic import split_task, write_jsonl
from posttrain.train.rl.recipe import run_rl

from conftest import sft_overrides

# A rule a briefly fine-tuned model meets only by chance (~1 in 10): answers that start with the digit 1.
# (Conditional rules such as "the first digit of the reversal" need far more steps than a test can spend.)
STARTS_WITH_ONE = "format:1.*"
FIRST_DIGIT = "def first_digit(prompts, completions, answer, **kw):\n" \
              "    return [float(c.strip()[:1] == a[:1]) for c, a in zip(completions, answer)]\n"


@pytest.fixture(scope="module")
def rl_setup(tiny_model_dir, task_data, tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("rl")
    assert main(["sft", *sft_overrides(tiny_model_dir, task_data, root / "sft", max_steps=30)]) == 0
    train, held = split_task(400, 32, seed=7)
    rows = lambda rs: [{"prompt": r["messages"][0]["content"], "answer": r["answer"]} for r in rs]  # noqa: E731
    (root / "reward.py").write_text(FIRST_DIGIT)
    return {"sft": root / "sft", "prompts": write_jsonl(rows(train), root / "prompts.jsonl"),
            "held": write_jsonl(rows(held), root / "held.jsonl"), "reward": root / "reward.py", "root": root}


def _overrides(setup, out, **extra) -> list[str]:
    args = dict(model_name_or_path=setup["sft"], dataset=setup["prompts"], eval_dataset=setup["held"],
                output_dir=out, reward_funcs=f"[{setup['reward']}:first_digit]", max_completion_length=10,
                rollout_batch_size=8, per_device_train_batch_size=32, learning_rate=1e-3, disable_tqdm=True, seed=0)
    args.update(extra)
    return [f"{k}={v}" for k, v in args.items()]


def _run(stage, setup, out, **extra):
    assert main([stage, *_overrides(setup, out, **extra)]) == 0
    return _records(out)


def _records(out):
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def test_grpo_raises_the_reward(rl_setup, tmp_path):
    out = tmp_path / "grpo"
    records = _run("grpo", rl_setup, out, max_steps=12, num_generations=4, eval_steps=100,
                   per_device_train_batch_size=16, reward_funcs=f"[{STARTS_WITH_ONE}]")
    steps = [r for r in records if "reward_mean" in r]
    evals = [r["eval_reward"] for r in records if "eval_reward" in r]
    assert len(steps) == 12 and len(evals) == 2
    first, last = sum(r["reward_mean"] for r in steps[:3]) / 3, sum(r["reward_mean"] for r in steps[-3:]) / 3
    assert last > first + 0.15, (first, last)
    assert evals[-1] > evals[0] + 0.2, evals
    for key in ("reward_std", "kl", "entropy", "clip_fraction", "response_length", "generation_s", "train_s",
                "rewards/format", "actor_lr"):
        assert key in steps[-1], key
    assert steps[-1]["kl"] > 0
    assert (out / "model.safetensors").is_file() and (out / "training_reward.png").stat().st_size > 1000
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)  # an ordinary HF folder


def test_ppo_trains_actor_and_critic(rl_setup, tmp_path):
    out = tmp_path / "ppo"
    records = _run("ppo", rl_setup, out, max_steps=6, num_generations=2, ppo_epochs=2, per_device_train_batch_size=8,
                   critic_learning_rate=1e-3, critic_warmup_steps=1, eval_steps=100)
    steps = [r for r in records if "reward_mean" in r]
    assert "actor_lr" not in steps[0] and "critic_lr" in steps[0]  # warm-up: the critic alone
    for key in ("value_loss", "explained_variance", "value_clip_fraction", "kl", "clip_fraction", "approx_kl"):
        assert key in steps[-1], key
    # Several mini-batches and epochs: the ratio moves off 1 on every actor step, far enough to clip on
    # some (which steps clip depends on the samples: a step whose advantages are all small clips nothing).
    assert all(r["approx_kl"] > 0 for r in steps[1:])
    assert max(r["clip_fraction"] for r in steps[1:]) > 0
    assert steps[-1]["value_loss"] < steps[0]["value_loss"]


def test_ppo_resumed_from_a_checkpoint_matches_the_run_that_was_not_stopped(rl_setup, tmp_path):
    # A critic, an adaptive KL coefficient and running reward statistics: all state a checkpoint must carry.
    settings = dict(max_steps=4, save_steps=2, logging_steps=1, num_generations=2, ppo_epochs=2,
                    per_device_train_batch_size=8, critic_learning_rate=1e-3, kl_target=0.01, kl_horizon=100, normalize_reward=True,
                    eval_steps=100)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    first = _run("ppo", rl_setup, straight, **settings)
    assert [p.name for p in straight.glob("checkpoint-*")] == ["checkpoint-2"]  # none at the last step
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")  # as if killed after step 2
    second = _run("ppo", rl_setup, resumed, resume_from_checkpoint="auto", **settings)

    def after_checkpoint(records):  # timings differ from run to run; everything else must not
        return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in records if r["step"] > 2]

    assert after_checkpoint(second) == after_checkpoint(first) and len(after_checkpoint(first)) >= 2
    assert [r["kl_coef"] for r in first if "kl_coef" in r][-1] != 0.05  # the adaptive coefficient moved
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_async_rollouts_run_one_step_off_policy_and_resume_exactly(rl_setup, tmp_path):
    # The next step's samples are drawn before this step trains; a checkpoint carries them, so the
    # resumed run trains on the very samples the uninterrupted one drew from the older weights.
    settings = dict(max_steps=4, save_steps=2, num_generations=4, per_device_train_batch_size=16, async_rollouts=1,
                    eval_steps=100, reward_funcs=f"[{STARTS_WITH_ONE}]", tis_cap=2.0)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    first = _run("grpo", rl_setup, straight, **settings)
    steps = [r for r in first if "reward_mean" in r]
    assert [r["staleness"] for r in steps] == [0, 1, 1, 1]  # the first step has no older weights to use
    # Off-policy by one update: the sampler's log-probs are the previous weights', no longer the trainer's.
    assert steps[0]["logp_gap"] < 1e-4 < steps[1]["logp_gap"] and steps[1]["tis_weight"] != 1
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    second = _run("grpo", rl_setup, resumed, resume_from_checkpoint="auto", **settings)

    def after_checkpoint(records):
        return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in records if r["step"] > 2]

    assert after_checkpoint(second) == after_checkpoint(first) and len(after_checkpoint(first)) >= 2
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    on_policy = _run("grpo", rl_setup, tmp_path / "on", **{**settings, "async_rollouts": 0, "save_steps": 500})
    assert [r["staleness"] for r in on_policy if "reward_mean" in r] == [0, 0, 0, 0]


def test_pissa_actor_has_its_starting_model_as_reference_and_is_saved_for_the_original_base(rl_setup, tmp_path):
    """PiSSA moves the base's principal part into the adapter: the base under it is a residual, neither the
    reference nor the base the saved adapter may apply to."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "pissa"
    result = run_rl(load_config("grpo", None, _overrides(
        rl_setup, out, max_steps=2, num_generations=2, advantage_estimator="rloo", finetuning_type="lora",
        lora_rank=4, pissa_init=True, pissa_iter=-1, eval_steps=100)))
    steps = [r for r in _records(out) if "reward_mean" in r]
    assert abs(steps[0]["kl"]) < 1e-4  # the first rollout, before any update: the policy IS its reference
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] is True and saved["r"] == 8  # converted: a plain LoRA, rank doubled
    assert not list(out.glob(".pissa-init-*"))
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    base = AutoModelForCausalLM.from_pretrained(rl_setup["sft"], dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, str(out)).eval()
    actor = result.objective.eval()
    with torch.no_grad():  # the actor stays where it trained (CUDA where there is one)
        want, got = (m(input_ids=ids.to(next(m.parameters()).device)).logits.float().cpu() for m in (actor, reloaded))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)

def test_lora_actor_uses_its_base_as_reference(rl_setup, tmp_path, caplog):
    out = tmp_path / "lora"
    with caplog.at_level(logging.INFO, logger="posttrain.generation.backend"):
        records = _run("grpo", rl_setup, out, max_steps=3, num_generations=2, finetuning_type="lora", lora_rank=4,
                       advantage_estimator="rloo", eval_steps=100)
    assert "transformers' generate" not in caplog.text  # the LoRA actor rolls out on the engine (merged copies)
    assert records[0]["rollout_backend"] == "engine"
    steps = [r for r in records if "reward_mean" in r]
    assert steps[-1]["kl"] > 0  # the adapter moved the policy away from its base
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    # The run's end is logged as every stage logs it: the size of the weights written.
    assert records[-1]["output_weights_bytes"] == (out / "adapter_model.safetensors").stat().st_size


def test_vllm_sleep_mode_is_refused_where_it_cannot_work(rl_setup, tmp_path, capsys):
    """Sleep mode frees GPU memory between phases: refused on CPU, beside async rollouts (which sample while the
    actor trains) and with another backend, each in one line before any model loads."""
    base = dict(model_name_or_path=rl_setup["sft"], dataset=rl_setup["prompts"], output_dir=tmp_path / "o",
                reward_funcs=f"[{STARTS_WITH_ONE}]", vllm_enable_sleep_mode="true", device="cpu")
    for extra, says in (({"rollout_backend": "vllm"}, "needs the model on a CUDA GPU"),
                        ({"rollout_backend": "auto"}, "needs the model on a CUDA GPU"),
                        ({"rollout_backend": "vllm", "async_rollouts": 1}, "choose one"),
                        ({"rollout_backend": "engine"}, "set rollout_backend: vllm")):
        assert main(["grpo", *[f"{k}={v}" for k, v in {**base, **extra}.items()]]) != 0
        err = capsys.readouterr().err
        assert says in err and "vllm_enable_sleep_mode" in err and "Traceback" not in err, err
        assert not (tmp_path / "o").exists()


def test_rollout_backend_vllm_without_vllm_says_how_to_get_it(rl_setup, tmp_path, monkeypatch, capsys):
    """Refused before any model loads: an output folder is never started."""
    monkeypatch.delenv("POSTTRAIN_VLLM_PYTHON", raising=False)
    base = dict(model_name_or_path=rl_setup["sft"], dataset=rl_setup["prompts"], output_dir=tmp_path / "o",
                reward_funcs=f"[{STARTS_WITH_ONE}]", rollout_backend="vllm")
    for extra, says in (({"vllm_python": tmp_path / "nope"}, "vllm_python: "), ({}, "make vllm")):
        assert main(["grpo", *[f"{k}={v}" for k, v in {**base, **extra}.items()]]) != 0
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err, err
        assert not (tmp_path / "o").exists()
