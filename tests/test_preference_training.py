"""DPO and KTO end to end through the CLI: preferences are learned, metrics are logged, the reference
pass runs once and is cached, and LoRA keeps the reference as the base with the adapter off."""

from __future__ import annotations

import json

import pytest
import torch
from inference_fixtures import one_torch_thread  # noqa: F401  (autouse: tiny models run single-threaded)

from posttrain.cli import main
from posttrain.data.synthetic import preference_pairs, split_task, write_jsonl


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("pref")
    train, _ = split_task(64, 0, seed=3)
    pairs = preference_pairs(train, seed=0)
    unpaired = [{"prompt": p["prompt"], "completion": p[k], "label": k == "chosen"}
                for p in pairs for k in ("chosen", "rejected")]
    return {"pairs": write_jsonl(pairs, root / "pairs.jsonl"), "unpaired": write_jsonl(unpaired, root / "kto.jsonl")}


def overrides(model, data, out, cache, **extra):
    base = dict(model_name_or_path=model, dataset=data, eval_dataset=data, output_dir=out, ref_cache_dir=cache,
                learning_rate=2e-3, lr_scheduler_type="constant", per_device_train_batch_size=16, max_steps=24,
                logging_steps=8, eval_steps=24, save_steps=0, cutoff_len=64, disable_tqdm=True, plot_loss=False,
                seed=0)
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_dpo_learns_the_preferences_and_logs_rewards(tiny_model_dir, pair_files, tmp_path, caplog):
    out, cache = tmp_path / "dpo", tmp_path / "cache"
    caplog.set_level("INFO")
    assert main(["dpo", *overrides(tiny_model_dir, pair_files["pairs"], out, cache, pref_beta=0.5)]) == 0
    logs = records(out)
    train = [r for r in logs if "loss" in r]
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin", "logps/chosen",
            "logps/rejected"} <= train[0].keys()
    [final] = [r for r in logs if "eval_loss" in r]
    # Before training the policy IS the reference: loss ln 2, margin 0. After: the pairs are separated.
    assert final["eval_loss"] < 0.45 and final["eval_rewards/accuracy"] >= 0.85 and final["eval_rewards/margin"] > 0.5
    assert train[-1]["rewards/accuracy"] > train[0]["rewards/accuracy"]
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    # eval_dataset is the training file here: the same tokens, so one cache entry serves both.
    assert len(list(cache.glob("*.safetensors"))) == 1
    assert "computing 128 sequences" in caplog.text and "for eval data: cached" in caplog.text

    # Another loss on the same model and data reuses the cached reference pass.
    caplog.clear()
    assert main(["dpo", *overrides(tiny_model_dir, pair_files["pairs"], tmp_path / "ipo", cache, pref_loss="ipo",
                                   max_steps=2, eval_steps=2)]) == 0
    assert "computing" not in caplog.text and "cached" in caplog.text
    # ... and a different cutoff (other tokens) is a different key.
    caplog.clear()
    assert main(["dpo", *overrides(tiny_model_dir, pair_files["pairs"], tmp_path / "cut", cache, cutoff_len=20,
                                   overlong="drop", max_steps=1, eval_steps=1)]) == 0
    assert "for training data: computing" in caplog.text


@pytest.mark.parametrize("loss", ["simpo", "orpo", "hinge", "robust", "bco_pair"])
def test_every_pref_loss_trains(tiny_model_dir, pair_files, tmp_path, loss):
    out = tmp_path / loss
    extra = {"dpo_label_smoothing": 0.1} if loss == "robust" else {}
    assert main(["dpo", *overrides(tiny_model_dir, pair_files["pairs"], out, tmp_path / "cache", pref_loss=loss,
                                   max_steps=6, eval_steps=6, logging_steps=3, pref_ftx=0.1, **extra)]) == 0
    losses = [r["loss"] for r in records(out) if "loss" in r]
    assert len(losses) == 2 and all(l == l for l in losses)  # finite
    # SimPO and ORPO need no reference: no reference pass, no cache entry.
    assert (tmp_path / "cache").exists() == (loss not in ("simpo", "orpo"))


def test_bco_running_mean_is_checkpointed_and_restored_on_resume(tiny_model_dir, pair_files, tmp_path):
    import shutil

    from safetensors.torch import load_file

    from posttrain.config import load_config
    from posttrain.train.dpo import run_dpo

    def run(out, **extra):  # in process: the result holds the trained objective and its statistics
        return run_dpo(load_config("dpo", None, overrides(
            tiny_model_dir, pair_files["pairs"], out, tmp_path / "cache", pref_loss="bco_pair", max_steps=4,
            save_steps=2, logging_steps=2, eval_dataset="null", **extra)))

    whole = run(tmp_path / "whole")
    state = load_file(tmp_path / "whole" / "checkpoint-2" / "model.safetensors")
    # Two steps of 16 pairs, two rewards each: the running mean's count and sum are in the checkpoint.
    assert state["bco_reward_count"].item() == 64 and state["bco_reward_sum"].item() != 0

    # A run stopped after checkpoint-2 and resumed from it ends where the uninterrupted run ended.
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "whole" / "checkpoint-2", resumed / "checkpoint-2")
    again = run(resumed, resume_from_checkpoint=resumed / "checkpoint-2")
    for name in ("bco_reward_sum", "bco_reward_count"):
        assert getattr(again.objective, name).item() == pytest.approx(getattr(whole.objective, name).item(), rel=1e-9)
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(resumed / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_lora_dpo_writes_an_adapter_and_uses_the_base_as_reference(tiny_model_dir, pair_files, tmp_path):
    out = tmp_path / "lora"
    assert main(["dpo", *overrides(tiny_model_dir, pair_files["pairs"], out, tmp_path / "cache", pref_beta=0.5,
                                   finetuning_type="lora", lora_rank=8, learning_rate=5e-3, max_steps=16,
                                   eval_steps=16)]) == 0
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    [final] = [r for r in records(out) if "eval_loss" in r]
    assert final["eval_rewards/margin"] > 0 and final["eval_loss"] < 0.69
    # The full model's cache key is the base model's: the LoRA run reused nothing it should not
    # have (its reference is the base), so a full run now finds the entry the LoRA run wrote.
    keys = set(p.name for p in (tmp_path / "cache").glob("*.safetensors"))
    assert main(["dpo", *overrides(tiny_model_dir, pair_files["pairs"], tmp_path / "full", tmp_path / "cache",
                                   max_steps=1, eval_steps=1)]) == 0
    assert set(p.name for p in (tmp_path / "cache").glob("*.safetensors")) == keys


def test_kto_learns_desirable_from_undesirable(tiny_model_dir, pair_files, tmp_path):
    out = tmp_path / "kto"
    assert main(["kto", *overrides(tiny_model_dir, pair_files["unpaired"], out, tmp_path / "cache", pref_beta=0.5,
                                   per_device_train_batch_size=32, kto_rejected_weight=1.0)]) == 0
    logs = records(out)
    assert {"kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"} <= logs[1].keys()
    [final] = [r for r in logs if "eval_loss" in r]
    # Untrained, every row's loss is 1 - σ(0) = 0.5 and both rewards are 0.
    assert final["eval_rewards/chosen"] - final["eval_rewards/rejected"] > 0.2 and final["eval_loss"] < 0.49


def test_kto_unpairs_preference_pairs_and_says_so(tiny_model_dir, pair_files, tmp_path, caplog):
    caplog.set_level("INFO")
    out = tmp_path / "kto-pairs"
    assert main(["kto", *overrides(tiny_model_dir, pair_files["pairs"], out, tmp_path / "cache", max_steps=2,
                                   eval_steps=2)]) == 0
    assert "64 training and 64 eval preference pairs (chosen/rejected, no label) unpaired for KTO" in caplog.text
    assert "64 desirable, 64 undesirable" in caplog.text
    assert (out / "model.safetensors").is_file()


def test_bad_preference_input_fails_before_training(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "chosen": "a", "rejected": "a"}\n')
    out = tmp_path / "never"
    assert main(["dpo", *overrides(tiny_model_dir, bad, out, tmp_path / "cache")]) == 2
    assert "bad.jsonl:2: chosen and rejected are identical" in capsys.readouterr().err
    assert not out.exists()
    assert main(["dpo", *overrides(tiny_model_dir, bad, out, tmp_path / "cache", packing=True)]) == 2
    assert "config key 'packing' is for sft, not for dpo" in capsys.readouterr().err
