"""The vllm generation backend against vLLM itself (its CPU build here, `make vllm`): run by `make test-vllm`.

vLLM runs in a worker process of its own environment ($POSTTRAIN_VLLM_PYTHON). Checked: the same greedy
tokens and log-probs as the built-in engine, before and after weights are sent (a full model reloaded
in place, a LoRA actor's adapter as a new version), seeds that hold whatever shares the batch, RL
on vLLM rollouts that raises the reward as it does on the engine, and Ray trainer ranks sharing one vLLM.
"""

from __future__ import annotations

import os

import pytest
import torch

from posttrain.generation.backend import open_backend
from posttrain.inference.sampling import SamplingParams
from posttrain.model.loading import load_tokenizer

from test_rl_training import STARTS_WITH_ONE, _run, rl_setup  # noqa: F401  (the fixture)

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def vllm_python():
    python = os.environ.get("POSTTRAIN_VLLM_PYTHON")
    assert python, "set POSTTRAIN_VLLM_PYTHON to the python of `make vllm`'s environment (make test-vllm does)"
    return python


def _model(tiny_model_dir, lora: bool = False):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    return model


def _prompts(tokenizer):
    return [tokenizer(f"reverse {'1234567'[:i + 2]} please")["input_ids"] for i in range(6)]


def _perturb(model, only: str = ""):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if only in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _assert_same(vllm, engine, prompts):
    params = [SamplingParams(max_new_tokens=12, ignore_eos=True, logprobs=0)] * len(prompts)
    ours, theirs = vllm.generate(prompts, params), engine.generate(prompts, params)
    for a, b in zip(ours, theirs):
        assert a.token_ids == b.token_ids and a.text == b.text
        assert max(abs(x.logprob - y.logprob) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4


def test_full_model_matches_the_engine_before_and_after_weights_are_sent(tiny_model_dir, vllm_python):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model, prompts = _model(tiny_model_dir), _prompts(tokenizer)
    vllm = open_backend("vllm", model, tokenizer, seed=3, vllm_options={"python": vllm_python})
    engine = open_backend("engine", model, tokenizer, seed=3)
    try:
        _assert_same(vllm, engine, prompts)
        before = vllm.generate(prompts, [SamplingParams(max_new_tokens=12, ignore_eos=True)] * len(prompts))
        _perturb(model)  # the trained weights, including the tied embedding / output head
        vllm.update_weights()
        after = vllm.generate(prompts, [SamplingParams(max_new_tokens=12, ignore_eos=True)] * len(prompts))
        assert [c.token_ids for c in before] != [c.token_ids for c in after]  # the update reached vLLM
        _assert_same(vllm, engine, prompts)
        # A seeded sample is the same whatever else is in the batch, and differs between seeds.
        sampled = lambda seeds, ps: vllm.generate(ps, [SamplingParams(max_new_tokens=12, temperature=1.0, seed=s)
                                                      for s in seeds])  # noqa: E731
        alone = sampled([5], prompts[:1])[0].token_ids
        assert sampled([9, 5, 7], [prompts[1], prompts[0], prompts[2]])[1].token_ids == alone
        assert sampled([6], prompts[:1])[0].token_ids != alone
    finally:
        vllm.close()
    assert not vllm.dir.exists() and vllm.proc is None  # the worker and its folder are gone


def test_lora_actor_is_sent_as_adapter_versions(tiny_model_dir, vllm_python):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model, prompts = _model(tiny_model_dir, lora=True), _prompts(tokenizer)
    _perturb(model, only="lora_B")  # an adapter that changes the output (B starts at zero)
    vllm = open_backend("vllm", model, tokenizer, seed=3, vllm_options={"python": vllm_python})
    engine = open_backend("engine", model, tokenizer, seed=3)
    try:
        _assert_same(vllm, engine, prompts)
        _perturb(model, only="lora_B")
        vllm.update_weights()
        assert vllm.version == 2 and not (vllm.dir / "v1").exists()  # one adapter version kept
        _assert_same(vllm, engine, prompts)
    finally:
        vllm.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="vLLM's sleep mode needs a CUDA GPU")
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_sleep_mode_frees_the_gpu_after_each_batch_and_samples_as_an_awake_vllm(tiny_model_dir, vllm_python, lora):
    """A sleeping vLLM (level 2 for a full model, 1 for a LoRA actor's base) holds little of the GPU between
    batches, and samples exactly what a vLLM that never slept samples, before and after an update."""
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model, prompts = _model(tiny_model_dir, lora=lora).cuda(), _prompts(tokenizer)
    if lora:
        _perturb(model, only="lora_B")
    params = [SamplingParams(max_new_tokens=12, ignore_eos=True, logprobs=0)] * len(prompts)
    options = {"python": vllm_python, "gpu_memory_utilization": 0.25}
    free, total = torch.cuda.mem_get_info()
    awake = open_backend("vllm", model, tokenizer, seed=3, vllm_options=options)
    beside_awake = torch.cuda.mem_get_info()[0]
    assert free - beside_awake > 0.2 * total  # an awake vLLM holds its share
    sleepy = open_backend("vllm", model, tokenizer, seed=3, vllm_options={**options, "enable_sleep_mode": True})
    try:
        assert beside_awake - torch.cuda.mem_get_info()[0] < 0.05 * total  # asleep from the start
        for update in (False, True):
            if update:
                _perturb(model, only="lora_B" if lora else "")
                awake.update_weights()
                sleepy.update_weights()
            want, got = awake.generate(prompts, params), sleepy.generate(prompts, params)
            assert beside_awake - torch.cuda.mem_get_info()[0] < 0.05 * total  # asleep again after the batch
            for a, b in zip(want, got):
                assert a.token_ids == b.token_ids
                assert max(abs(x.logprob - y.logprob) for x, y in zip(a.logprobs, b.logprobs)) < 1e-5
            if not update:
                first = [c.token_ids for c in got]
        assert [c.token_ids for c in got] != first  # the update changed what is sampled, asleep or not
    finally:
        sleepy.close()
        awake.close()


def test_a_killed_worker_is_reported_in_one_line_and_leaves_no_vllm_process(tiny_model_dir, vllm_python):
    """vLLM starts processes of its own, which outlive a worker killed under them (out of memory): the next call
    says how it ended, and closing ends the whole group."""
    import signal

    from posttrain.errors import PosttrainError
    from posttrain.generation.vllm_process import live_members

    tokenizer = load_tokenizer(str(tiny_model_dir))
    model, prompts = _model(tiny_model_dir), _prompts(tokenizer)
    vllm = open_backend("vllm", model, tokenizer, seed=3, vllm_options={"python": vllm_python})
    params = [SamplingParams(max_new_tokens=4, ignore_eos=True)] * len(prompts)
    try:
        vllm.generate(prompts, params)
        leader = vllm.proc.pid
        assert len(live_members(leader)) >= 2  # the worker and vLLM's engine process(es)
        started = vllm.submit(prompts, [SamplingParams(max_new_tokens=1500, ignore_eos=True)] * len(prompts))
        os.kill(leader, signal.SIGKILL)  # while it generates
        with pytest.raises(PosttrainError, match=r"vLLM worker ended during generate \(killed by SIGKILL: out of "
                                                 r"memory, or killed by hand\)$"):
            vllm.collect(started)
        with pytest.raises(PosttrainError, match="vLLM worker is not running .killed by SIGKILL"):
            vllm.generate(prompts, params)
    finally:
        vllm.close()
    assert live_members(leader) == []


def test_dora_is_refused_with_the_backend_that_runs_it(tiny_model_dir, vllm_python):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from posttrain.errors import ConfigError

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ConfigError, match="DoRA.*rollout_backend: hf"):
        open_backend("vllm", model, load_tokenizer(str(tiny_model_dir)), vllm_options={"python": vllm_python})


def test_grpo_on_vllm_rollouts_raises_the_reward(rl_setup, tmp_path, vllm_python):
    out = tmp_path / "grpo"
    records = _run("grpo", rl_setup, out, max_steps=12, num_generations=4, eval_steps=100,
                   per_device_train_batch_size=16, reward_funcs=f"[{STARTS_WITH_ONE}]", rollout_backend="vllm",
                   vllm_python=vllm_python, tis_cap=2.0)
    assert records[0]["rollout_backend"] == "vllm"
    steps = [r for r in records if "reward_mean" in r]
    evals = [r["eval_reward"] for r in records if "eval_reward" in r]
    first, last = sum(r["reward_mean"] for r in steps[:3]) / 3, sum(r["reward_mean"] for r in steps[-3:]) / 3
    assert last > first + 0.15, (first, last)
    assert evals[-1] > evals[0] + 0.2, evals
    # vLLM sampled the policy being trained: its log-probs are the trainer's (fp32 both), so the importance
    # weights are 1 and the weights sent after every step were the right ones.
    assert max(r["logp_gap"] for r in steps) < 1e-3
    assert all(abs(r["tis_weight"] - 1) < 1e-3 for r in steps)


def test_lora_grpo_and_ppo_on_vllm_rollouts(rl_setup, tmp_path, vllm_python):
    lora = _run("grpo", rl_setup, tmp_path / "lora", max_steps=8, num_generations=4, eval_steps=100,
                per_device_train_batch_size=16, reward_funcs=f"[{STARTS_WITH_ONE}]", rollout_backend="vllm",
                vllm_python=vllm_python, finetuning_type="lora", lora_rank=8, learning_rate=5e-3)
    steps = [r for r in lora if "reward_mean" in r]
    assert lora[0]["rollout_backend"] == "vllm" and max(r["logp_gap"] for r in steps) < 1e-3
    assert steps[-1]["kl"] > 0  # the adapter moved the policy, and vLLM sampled the moved policy (the gap)
    assert (tmp_path / "lora" / "adapter_config.json").is_file()
    ppo = _run("ppo", rl_setup, tmp_path / "ppo", max_steps=4, num_generations=2, ppo_epochs=2,
               per_device_train_batch_size=8, critic_learning_rate=1e-3, eval_steps=100, rollout_backend="vllm",
               vllm_python=vllm_python)
    steps = [r for r in ppo if "reward_mean" in r]
    assert ppo[0]["rollout_backend"] == "vllm" and "value_loss" in steps[-1]
    # The actor moved off its reference, and every step's rollouts came from its weights of that step.
    assert steps[-1]["kl"] > 0 and max(r["logp_gap"] for r in steps) < 1e-3



def test_lora_grpo_on_ray_trainer_ranks_sharing_one_vllm_sampler(rl_setup, tmp_path, vllm_python):
    """OpenRLHF's layout: two trainer ranks in Ray actors, vLLM in an actor of its own that both sample from;
    rank 0 sends it the adapter after each step, and neither rank samples before it has."""
    records = _run("grpo", rl_setup, tmp_path / "ray", max_steps=6, num_generations=4, eval_steps=100,
                   rollout_batch_size=4, per_device_train_batch_size=16, reward_funcs=f"[{STARTS_WITH_ONE}]",
                   rollout_backend="vllm", vllm_python=vllm_python, finetuning_type="lora", lora_rank=8,
                   learning_rate=5e-3, placement="ray", ray_trainer_ranks=2, ray_separate_roles=True,
                   ray_num_cpus_per_role=0.6)
    steps = [r for r in records if "reward_mean" in r]
    assert records[0]["rollout_backend"] == "ray/vllm" and records[0]["parallel"] == "DDP over 2 processes"
    # Both ranks' samples (the metrics are reduced over them) came from the adapter of their step.
    assert len(steps) == 6 and steps[-1]["kl"] > 0 and max(r["logp_gap"] for r in steps) < 1e-3
    assert (tmp_path / "ray" / "adapter_config.json").is_file()


def test_async_rollouts_on_vllm_resume_to_the_same_weights(rl_setup, tmp_path, vllm_python):
    # vLLM samples step k+1 while the trainer trains step k; a checkpoint carries those samples.
    import shutil

    from safetensors.torch import load_file

    settings = dict(max_steps=4, save_steps=2, num_generations=4, per_device_train_batch_size=16, async_rollouts=1,
                    eval_steps=100, reward_funcs=f"[{STARTS_WITH_ONE}]", rollout_backend="vllm",
                    vllm_python=vllm_python)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    first = _run("grpo", rl_setup, straight, **settings)
    assert [r["staleness"] for r in first if "reward_mean" in r] == [0, 1, 1, 1]
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    second = _run("grpo", rl_setup, resumed, resume_from_checkpoint="auto", **settings)
    keep = lambda rs: [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rs if r["step"] > 2]  # noqa
    assert keep(second) == keep(first)
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
