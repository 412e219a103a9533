"""`placement: ray`: the sampler, the reference and the reward model in Ray actors of their own (a local
Ray on this machine's 2 CPUs, half a CPU per role) give the same run as one process with the same seed."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from posttrain.cli import main

from test_rl_training import STARTS_WITH_ONE, _run, rl_setup  # noqa: F401  (the fixture)
from test_rm import rm_data, rm_overrides  # noqa: F401  (the fixture)

pytestmark = pytest.mark.ray
PLACED = dict(placement="ray", ray_num_cpus_per_role=0.5)


def _same_run(a: list[dict], b: list[dict]) -> None:
    drop = lambda r: {k: v for k, v in r.items() if not k.endswith("_s") and k != "rollout_backend"}  # noqa: E731
    assert [drop(r) for r in a] == [drop(r) for r in b]


def _same_weights(x, y) -> None:
    a, b = load_file(x / "model.safetensors"), load_file(y / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ppo_with_the_reference_and_sampler_on_ray_matches_one_process(rl_setup, tmp_path):
    settings = dict(max_steps=3, num_generations=2, ppo_epochs=2, per_device_train_batch_size=8,
                    critic_learning_rate=1e-3, kl_coef=0.05, eval_steps=2)
    alone = _run("ppo", rl_setup, tmp_path / "alone", **settings)
    placed = _run("ppo", rl_setup, tmp_path / "placed", **settings, **PLACED)
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

