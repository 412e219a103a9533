"""A `posttrain dpo` folder as a reward model: `posttrain score` and PPO's reward_model read its implicit reward,
beta * (log pi(y|x) - log pi_ref(y|x)) over the response's tokens, the very reward DPO's own eval logs."""

from __future__ import annotations

import json

import pytest
import yaml

from posttrain.cli import main
from posttrain.train.memory_plan import plan_memory

from test_memory_plan import _config, _parts
from test_preference_training import overrides, pair_files, records  # noqa: F401  (the fixture)
from test_rl_training import _run, rl_setup  # noqa: F401  (the fixture)


@pytest.fixture(scope="module")
def dpo_folders(tiny_model_dir, pair_files, tmp_path_factory):
    root = tmp_path_factory.mktemp("implicit")
    folders = {}
    for kind, extra in (("full", {}), ("lora", dict(finetuning_type="lora", lora_rank=8, learning_rate=5e-3))):
        folders[kind] = root / kind
        assert main(["dpo", *overrides(tiny_model_dir, pair_files["pairs"], folders[kind], root / "cache",
                                       pref_beta=0.5, max_steps=16, eval_steps=16, **extra)]) == 0
    return folders


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_a_dpo_folder_scores_pairs_by_the_reward_its_training_logged(kind, dpo_folders, pair_files, tmp_path, capsys):
    folder, scores = dpo_folders[kind], tmp_path / "scores.jsonl"
    assert main(["score", str(folder), str(pair_files["pairs"]), "--output", str(scores)]) == 0
    assert "(implicit (DPO))" in capsys.readouterr().err
    rows = [json.loads(line) for line in scores.read_text().splitlines()]
    [final] = [r for r in records(folder) if "eval_rewards/chosen" in r]  # DPO's eval over the same pairs
    mean = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    assert mean("chosen") == pytest.approx(final["eval_rewards/chosen"], abs=1e-4)
    assert mean("rejected") == pytest.approx(final["eval_rewards/rejected"], abs=1e-4)
    accuracy = sum(r["chosen"] > r["rejected"] for r in rows) / len(rows)
    assert accuracy == pytest.approx(final["eval_rewards/accuracy"]) and accuracy > 0.5


def test_ppo_maximizes_a_dpo_folders_implicit_reward(dpo_folders, rl_setup, tiny_model_dir, tmp_path, caplog):
    folder = dpo_folders["full"]
    with caplog.at_level("INFO", logger="posttrain"):
        run = _run("ppo", rl_setup, tmp_path / "ppo", reward_model=folder, reward_funcs="[exact_match]",
                   reward_weights="[1.0,0.0]", retain_eval_dataset=rl_setup["held"], retain_metric="exact_match",
                   max_steps=2, eval_steps=2, kl_coef=0.05)
    assert all("rewards/model" in r for r in run if "kl" in r)
    assert any(f"critic: a value head on {rl_setup['sft']}" in r.getMessage() for r in caplog.records)  # no head
    assert "eval_retain_rewards/exact_match" in run[0]
    # The memory plan counts what the reward holds: the DPO policy and its reference, or a LoRA one's base once.
    parts = _parts(plan_memory(_config(tiny_model_dir, "ppo", reward_model=folder)))
    assert {"reward model: DPO policy (fp32, whole)", "reward model: its DPO reference (fp32, whole)"} <= parts.keys()
    lora = _parts(plan_memory(_config(tiny_model_dir, "grpo", reward_model=dpo_folders["lora"])))
    assert "reward model: DPO policy (LoRA) on its reference (fp32, whole)" in lora


def _copy_with(folder, tmp_path, **recorded):
    import shutil

    copy = tmp_path / f"{folder.name}-edited"
    shutil.copytree(folder, copy)
    config = yaml.safe_load((copy / "posttrain_config.yaml").read_text())
    (copy / "posttrain_config.yaml").write_text(yaml.safe_dump({**config, **recorded}))
    return copy


def test_a_reference_recorded_relative_to_where_dpo_ran_is_found_from_anywhere(tiny_model_dir, pair_files, tmp_path,
                                                                              monkeypatch, capsys):
    import shutil

    launched = tmp_path / "project"
    shutil.copytree(tiny_model_dir, launched / "models" / "sft")
    monkeypatch.chdir(launched)
    assert main(["dpo", *overrides("models/sft", pair_files["pairs"], "runs/dpo", "cache", max_steps=2,
                                   eval_steps=2)]) == 0
    assert yaml.safe_load((launched / "runs/dpo/posttrain_config.yaml").read_text())["model_name_or_path"] == \
        "models/sft"
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "models" / "sft").mkdir(parents=True)  # a folder of the same name here is not the reference
    monkeypatch.chdir(elsewhere)
    assert main(["score", str(launched / "runs/dpo"), str(pair_files["pairs"])]) == 0
    capsys.readouterr()
    shutil.move(launched / "runs" / "dpo", tmp_path / "moved")  # now nothing tells where it ran
    assert main(["score", str(tmp_path / "moved"), str(pair_files["pairs"])]) == 2
    assert "relative to where it ran, which this folder no longer tells (moved since" in capsys.readouterr().err


def test_a_dpo_run_that_has_not_finished_is_refused(dpo_folders, pair_files, tmp_path, capsys):
    folder = _copy_with(dpo_folders["full"], tmp_path)
    (folder / "config.json").unlink()
    assert main(["score", str(folder), str(pair_files["pairs"])]) == 2
    assert "a `posttrain dpo` folder with no model in it yet" in capsys.readouterr().err


@pytest.mark.parametrize("edit, says", [
    ({"pref_loss": "simpo"}, "pref_loss simpo, which has no reference model and so no implicit reward"),
    ({"model_name_or_path": "/nowhere/sft"}, "the reference its DPO run recorded"),
])
def test_a_dpo_folder_without_a_usable_reference_is_refused(edit, says, dpo_folders, rl_setup, pair_files, tmp_path,
                                                           capsys):
    folder = _copy_with(dpo_folders["full"], tmp_path, **edit)
    assert main(["score", str(folder), str(pair_files["pairs"])]) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(AssertionError):
        _run("grpo", rl_setup, tmp_path / "grpo", reward_model=folder)
    err = capsys.readouterr().err
    assert says in err and not (tmp_path / "grpo").exists()


def test_a_retain_metric_that_is_not_a_reward_of_the_run_is_refused(rl_setup, tmp_path, capsys):
    with pytest.raises(AssertionError):
        _run("grpo", rl_setup, tmp_path / "grpo", reward_funcs="[exact_match]", retain_metric="exact_mach",
             retain_eval_dataset=rl_setup["held"])
    err = capsys.readouterr().err
    assert "retain_metric: 'exact_mach' is not one of this run's rewards; use reward (the total) or one of " \
           "exact_match" in err, err
    with pytest.raises(AssertionError):
        _run("grpo", rl_setup, tmp_path / "grpo", reward_funcs="[exact_match]", retain_metric="exact_match")
    assert "set retain_eval_dataset too, or leave retain_metric unset" in capsys.readouterr().err
    assert not (tmp_path / "grpo").exists()
