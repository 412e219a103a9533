"""`placement: ray`: the sampler, the reference and the reward model in Ray actors of their own (a local
Ray on this machine's 2 CPUs, half a CPU per role) give the same run as one process with the same seed; with
`ray_trainer_ranks: 2` the trainer's two ranks in Ray actors give the same run as torchrun's two processes."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from posttrain.cli import main

from test_rl_distributed import _grpo, grpo_task
from test_rl_training import STARTS_WITH_ONE, _run, rl_setup  # noqa: F401  (the fixture)
from test_rm import rm_data, rm_overrides  # noqa: F401  (the fixture)
from test_sharded import zero3_config  # noqa: F401  (the fixture)

pytestmark = pytest.mark.ray
PLACED = dict(placement="ray", ray_num_cpus_per_role=0.5)


def _same_run(a: list[dict], b: list[dict]) -> None:
    drop = lambda r: {k: v for k, v in r.items() if not k.endswith("_s") and k != "rollout_backend"}  # noqa: E731
    assert [drop(r) for r in a] == [drop(r) for r in b]


def _same_weights(x, y) -> None:
    a, b = load_file(x / "model.safetensors"), load_file(y / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("weight_sync", ["object_store", "collective"])
def test_ppo_with_the_reference_and_sampler_on_ray_matches_one_process(weight_sync, rl_setup, tmp_path):
    settings = dict(max_steps=3, num_generations=2, ppo_epochs=2, per_device_train_batch_size=8,
                    critic_learning_rate=1e-3, kl_coef=0.05, eval_steps=2)
    alone = _run("ppo", rl_setup, tmp_path / "alone", **settings)
    placed = _run("ppo", rl_setup, tmp_path / "placed", **settings, **PLACED, ray_weight_sync=weight_sync)
    assert placed[0]["rollout_backend"] == "ray/engine" and alone[0]["rollout_backend"] == "engine"
    assert [r for r in placed if "kl" in r][-1]["kl"] > 0  # the reference (in its actor) was used
    _same_run(alone, placed)
    _same_weights(tmp_path / "alone", tmp_path / "placed")


def test_grpo_with_the_reward_model_on_ray_matches_one_process(rl_setup, rm_data, tiny_model_dir, tmp_path):
    rm = tmp_path / "rm"
    assert main(["rm", *rm_overrides(tiny_model_dir, rm_data, rm, max_steps=4)]) == 0
    settings = dict(max_steps=3, num_generations=4, per_device_train_batch_size=16, reward_model=rm,
                    reward_funcs=f"[{STARTS_WITH_ONE}]", eval_steps=100)
    alone = _run("grpo", rl_setup, tmp_path / "alone", **settings)
    placed = _run("grpo", rl_setup, tmp_path / "placed", **settings, **PLACED)
    assert "rewards/model" in placed[1]
    _same_run(alone, placed)
    _same_weights(tmp_path / "alone", tmp_path / "placed")


def test_roles_that_do_not_fit_the_cluster_are_refused(rl_setup, tmp_path, capsys):
    code = main(["grpo", f"model_name_or_path={rl_setup['sft']}", f"dataset={rl_setup['prompts']}",
                 f"output_dir={tmp_path / 'o'}", f"reward_funcs=[{STARTS_WITH_ONE}]", "placement=ray",
                 "ray_num_cpus_per_role=4"])
    assert code != 0
    err = capsys.readouterr().err
    assert "ray_num_cpus_per_role" in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()



def test_rollouts_sampled_on_other_weights_than_asked_are_told(tiny_model_dir, caplog):
    """A sampler shared by ranks serves each rank's request on the weights version that rank asked for; where Ray
    delivered the request after another rank's weight update (callers are not ordered among themselves), the rank
    says so. The late delivery is played here by loading the next version before this rank's request."""
    from posttrain.config import GRPOConfig, build_config
    from posttrain.model.loading import load_model, load_tokenizer
    from posttrain.train.rl.placement import RaySession
    from posttrain.train.rl.rollout import RolloutSampler

    config = build_config(GRPOConfig, dict(model_name_or_path=str(tiny_model_dir), dataset="unused",
                                           output_dir="unused", reward_funcs=["exact_match"], **PLACED))
    model, tokenizer = load_model(str(tiny_model_dir), device=torch.device("cpu")), load_tokenizer(str(tiny_model_dir))
    session = RaySession(config, roles=["rollout"], threads=1)
    try:
        sampler = RolloutSampler(model, tokenizer, max_batch_size=4, seed=0, placed=session)
        prompts, greedy = [tokenizer("reverse 123")["input_ids"]], dict(max_new_tokens=4, temperature=0.0)
        with caplog.at_level("WARNING", logger="posttrain.train.rl.placement"):
            before = sampler.sample(prompts, **greedy)
            with torch.no_grad():
                model.lm_head.weight.mul_(-1.0)  # other greedy tokens
            sampler.update_weights()
            after = sampler.sample(prompts, **greedy)
            assert not caplog.records and after[0].response_ids != before[0].response_ids
            # Another rank's next update reaches the sampler before this rank's request for version 1.
            backend = sampler.backend
            backend.role.call("load", {k: v.detach() for k, v in model.named_parameters()}, backend.version + 1)
            assert backend.newer_by == 0
            sampler.sample(prompts, **greedy)
        assert backend.reordered == 1 and backend.newer_by == 1  # the trainer counts the staleness from it
        assert [r.getMessage() for r in caplog.records] == [
            "rollouts sampled on weights version 2 where this rank asked for version 1: the shared sampler received "
            "another rank's weight update first; the run stays on-policy within async_rollouts but no longer repeats "
            "bit for bit"]
        sampler.close()
    finally:
        session.close()


@pytest.mark.parametrize("layout", [
    {"ray_num_cpus_per_role": 1},  # each rank holds every role
    # the sampler and the reference in actors of their own, beside the ranks: 4 x half a CPU
    {"ray_separate_roles": True, "ray_num_cpus_per_role": 0.5},
    {"ray_separate_roles": True, "ray_num_cpus_per_role": 0.5, "fsdp": "full_shard"},
    {"ray_num_cpus_per_role": 1, "deepspeed": "ZeRO-3"},
    {"ray_num_cpus_per_role": 1, "fsdp": "full_shard"},
    {"ray_separate_roles": True, "ray_num_cpus_per_role": 0.5, "deepspeed": "ZeRO-3"},
    # sampling one step ahead, the weights through the object store
    {"ray_separate_roles": True, "ray_num_cpus_per_role": 0.5, "async_rollouts": 1, "ray_weight_sync": "object_store"},
], ids=["colocated", "separate-roles", "separate-roles-fsdp", "colocated-deepspeed", "colocated-fsdp",
        "separate-roles-deepspeed", "separate-roles-async"])
def test_trainer_ranks_on_ray_match_torchrun(layout, tiny_model_dir, tmp_path, zero3_config):
    prompts, reward = grpo_task(tmp_path)
    layout = {k: zero3_config if k == "deepspeed" else v for k, v in layout.items()}
    sharding = {k: v for k, v in layout.items() if k in ("fsdp", "deepspeed", "async_rollouts")}
    torchrun = _grpo(tiny_model_dir, prompts, reward, tmp_path / "torchrun", procs=2, prompts_per_proc=2, **sharding)
    ray = _grpo(tiny_model_dir, prompts, reward, tmp_path / "ray", procs=1, prompts_per_proc=2, placement="ray",
                ray_trainer_ranks=2, **layout)
    assert len([r for r in ray if "reward_mean" in r]) == 3 and any(r["reward_std"] > 0 for r in ray if "reward_std" in r)
    assert ray[0]["rollout_backend"] == ("ray/engine" if layout.get("ray_separate_roles") else "engine")
    assert any(r.get("staleness", 0) > 0 for r in ray) == bool(layout.get("async_rollouts"))  # sampled ahead
    _same_run(torchrun, ray)  # rank 0's log: the same samples, rewards, KL
    _same_weights(tmp_path / "torchrun", tmp_path / "ray")  # the same code and reductions: bit for bit
    saved = (tmp_path / "ray" / "posttrain_config.yaml").read_text()  # what reruns (or resumes) this layout
    assert "placement: ray\n" in saved and "ray_trainer_ranks: 2\n" in saved


def test_ppo_on_trainer_ranks_sharing_the_sampler_reference_and_reward_model_matches_torchrun(rm_data, tiny_model_dir,
                                                                                              tmp_path):
    rm = tmp_path / "rm"
    assert main(["rm", *rm_overrides(tiny_model_dir, rm_data, rm, max_steps=4)]) == 0
    prompts, reward = grpo_task(tmp_path)
    ppo = dict(stage="ppo", reward_model=rm, ppo_epochs=2, critic_learning_rate=1e-3)
    torchrun = _grpo(tiny_model_dir, prompts, reward, tmp_path / "torchrun", procs=2, prompts_per_proc=2, **ppo)
    # 2 ranks, the sampler, the reference and the reward model: 5 x 0.4 CPU
    ray = _grpo(tiny_model_dir, prompts, reward, tmp_path / "ray", procs=1, prompts_per_proc=2, placement="ray",
                ray_trainer_ranks=2, ray_separate_roles=True, ray_num_cpus_per_role=0.4, **ppo)
    assert "rewards/model" in ray[1] and "value_loss" in ray[1]
    _same_run(torchrun, ray)
    _same_weights(tmp_path / "torchrun", tmp_path / "ray")


@pytest.mark.parametrize("layout", [{"ray_num_cpus_per_role": 0.5},  # the sampler and the reference in actors
                                    {"ray_trainer_ranks": 2, "ray_separate_roles": True, "ray_num_cpus_per_role": 0.5}],
                         ids=["beside-this-process", "trainer-ranks-separate-roles"])
def test_a_placed_run_resumed_from_its_checkpoint_ends_with_the_uninterrupted_weights(layout, tiny_model_dir, tmp_path):
    import shutil

    prompts, reward = grpo_task(tmp_path)
    placed = dict(placement="ray", save_steps=2, **layout)
    straight = _grpo(tiny_model_dir, prompts, reward, tmp_path / "straight", procs=1, prompts_per_proc=2, **placed)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "straight" / "checkpoint-2", resumed / "checkpoint-2")  # as if killed after step 2
    again = _grpo(tiny_model_dir, prompts, reward, resumed, procs=1, prompts_per_proc=2, resume_from_checkpoint="auto",
                  **placed)
    last = lambda records: [r for r in records if "reward_mean" in r][-1]  # noqa: E731
    _same_run([last(straight)], [last(again)])  # step 3: the same samples (the sampler got the checkpoint's weights)
    _same_weights(tmp_path / "straight", resumed)


def test_the_ray_example_runs_as_shipped(tiny_model_dir, tmp_path):
    """examples/grpo_ray.yaml on this machine's CPUs, with only the model, data and length made small."""
    import subprocess
    import sys
    from pathlib import Path

    from child_env import child_env

    prompts, _ = grpo_task(tmp_path)
    example = Path(__file__).resolve().parents[1] / "examples" / "grpo_ray.yaml"
    res = subprocess.run([sys.executable, "-m", "posttrain", "grpo", str(example), f"model_name_or_path={tiny_model_dir}",
                          f"dataset={prompts}", f"output_dir={tmp_path / 'o'}", "max_steps=2",
                          "max_completion_length=8"], env=child_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "rollout, reference in actors of their own" in res.stderr
    assert (tmp_path / "o" / "model.safetensors").is_file()


ONLY_ONE_RANK_FAILS = ("import os\n\ndef reward(prompts, completions, **kw):\n"
                       "    if os.environ['RANK'] == '{rank}':\n        raise ValueError('rank {rank} refuses')\n"
                       "    return [float(len(c) % 5) for c in completions]\n")


@pytest.mark.parametrize("broken, layout", [
    ("data-on-every-rank", ["ray_num_cpus_per_role=1"]), ("reward-on-rank-1", ["ray_num_cpus_per_role=1"]),
    # rank 0 then waits for rank 1 at the sampler's next weight update
    ("reward-on-rank-1", ["ray_separate_roles=true", "ray_num_cpus_per_role=0.5", "kl_coef=0.05"]),
    # rank 0 owns the shared roles: they go with it, and rank 1 then fails on them; rank 0's error is shown
    ("reward-on-rank-0", ["ray_separate_roles=true", "ray_num_cpus_per_role=0.5", "kl_coef=0.05"]),
], ids=["data-on-every-rank", "reward-on-rank-1", "reward-on-rank-1-separate-roles", "reward-on-rank-0-separate-roles"])
def test_a_trainer_rank_that_fails_stops_them_all_with_its_one_line_error(broken, layout, tiny_model_dir, tmp_path):
    """A rank's own error is what the user reads, also when only that rank raised it and its peer then failed on
    the closed connection; nothing is left running or written."""
    import subprocess
    import sys

    from child_env import child_env

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "reverse 12", "answer": "21"}\n' * 4 + ('{"prompt": 5\n' if broken.startswith("data")
                                                                            else ""))
    reward = tmp_path / "reward.py"
    reward.write_text(ONLY_ONE_RANK_FAILS.replace("{rank}", broken[-1]))
    res = subprocess.run([sys.executable, "-m", "posttrain", "grpo", f"model_name_or_path={tiny_model_dir}",
                          f"dataset={prompts}", f"output_dir={tmp_path / 'o'}", f"reward_funcs=[{reward}:reward]",
                          "rollout_batch_size=1", "max_steps=2", "placement=ray", "ray_trainer_ranks=2", *layout],
                         env=child_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    if broken.startswith("data"):
        assert last == f"error: {prompts}:5: invalid JSON: Expecting ',' delimiter at column 1"
    else:
        assert last.startswith("error: ") and f"rank {broken[-1]} refuses" in last, last
    assert "Traceback" not in res.stderr and not (tmp_path / "o" / "model.safetensors").exists()


@pytest.mark.parametrize("address, says", [("127.0.0.1:1", "nothing answers there"), ("auto", "ray start --head"),
                                           ("no-port", "is not HOST:PORT")])
def test_a_cluster_address_that_leads_nowhere_is_refused_at_once(address, says, rl_setup, tmp_path, capsys):
    """Ray itself would retry an address where nothing listens for ever."""
    code = main(["grpo", f"model_name_or_path={rl_setup['sft']}", f"dataset={rl_setup['prompts']}",
                 f"output_dir={tmp_path / 'o'}", f"reward_funcs=[{STARTS_WITH_ONE}]", "placement=ray",
                 f"ray_address={address}"])
    err = capsys.readouterr().err
    assert code == 2 and says in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()
