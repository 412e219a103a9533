"""Reward models end to end: pair accuracy rises, the folder loads back as a reward model with its
reward statistics, `posttrain score` scores rows and pairs, and LoRA reward models save merged."""

from __future__ import annotations

import json

import pytest
import torch
from inference_fixtures import one_torch_thread  # noqa: F401  (autouse: tiny models run single-threaded)

from posttrain.cli import main
from posttrain.data.synthetic import preference_pairs, split_task, write_jsonl


@pytest.fixture(scope="module")
def rm_data(tmp_path_factory):
    """Answers against refusals: a signal a random tiny model can pick up in a few dozen steps, so the
    test checks the pipeline (head, read-out position, loss sign), not model capacity. The quickstart
    shows the harder task: exact answers against near misses, from the SFT model."""
    root = tmp_path_factory.mktemp("rm")
    train, held_out = split_task(96, 48, seed=5)
    refusals = lambda rows: [{**p, "rejected": "I do not know."} for p in preference_pairs(rows, seed=0)]  # noqa: E731
    return {"train": write_jsonl(refusals(train), root / "train.jsonl"),
            "eval": write_jsonl(refusals(held_out), root / "eval.jsonl"),
            "rows": write_jsonl([{"prompt": "reverse 123", "completion": "321"},
                                 {"prompt": "reverse 123", "completion": "I do not know."}], root / "rows.jsonl")}


def rm_overrides(model, data, out, **extra):
    base = dict(model_name_or_path=model, dataset=data["train"], eval_dataset=data["eval"], output_dir=out,
                learning_rate=1e-3, lr_scheduler_type="constant", per_device_train_batch_size=16, max_steps=24,
                logging_steps=8, eval_steps=24, save_steps=0, cutoff_len=64, disable_tqdm=True, plot_loss=False,
                seed=0)
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="module")
def trained_rm(tiny_model_dir, rm_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("rm-out") / "rm"
    assert main(["rm", *rm_overrides(tiny_model_dir, rm_data, out)]) == 0
    return out


def test_rm_pair_accuracy_rises(trained_rm):
    logs = [json.loads(line) for line in (trained_rm / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in logs if "loss" in r]
    assert {"accuracy", "margin", "rewards/chosen", "rewards/rejected"} <= train[0].keys()
    assert train[-1]["loss"] < train[0]["loss"]
    [final] = [r for r in logs if "eval_loss" in r]
    assert final["eval_accuracy"] >= 0.95 and final["eval_margin"] > 1.0 and final["eval_loss"] < 0.3


def test_rm_folder_loads_as_a_reward_model_with_its_statistics(trained_rm, tiny_tokenizer):
    from transformers import AutoModelForSequenceClassification

    from posttrain.data.pairs import response_renderer, tokenize_response
    from posttrain.data.schema import Message
    from posttrain.model.reward import load_reward_model, reward_stats, sequence_rewards

    from transformers import AutoConfig

    config = json.loads((trained_rm / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert AutoConfig.from_pretrained(trained_rm).num_labels == 1
    mean, std = reward_stats(trained_rm)
    assert std > 0 and mean == config["reward_mean"]

    plain = AutoModelForSequenceClassification.from_pretrained(trained_rm).eval()
    ours = load_reward_model(str(trained_rm), device=torch.device("cpu")).eval()
    seq = tokenize_response(response_renderer(tiny_tokenizer, None), [Message("user", "reverse 12")],
                            Message("assistant", "21"), None, "")
    ids = torch.tensor([seq.input_ids])
    with torch.no_grad():
        assert plain(input_ids=ids).logits[0, 0].item() == pytest.approx(
            sequence_rewards(ours, ids, torch.ones_like(ids)).item(), abs=1e-5)
        # Right padding does not move the read-out: it is at the last real token, whatever pads.
        padded = torch.cat([ids, torch.full((1, 3), tiny_tokenizer.eos_token_id)], dim=1)
        mask = torch.cat([torch.ones_like(ids), torch.zeros(1, 3, dtype=torch.long)], dim=1)
        assert sequence_rewards(ours, padded, mask).item() == pytest.approx(
            sequence_rewards(ours, ids, torch.ones_like(ids)).item(), abs=1e-5)


def test_score_command_scores_rows_and_pairs(trained_rm, rm_data, tmp_path, capsys):
    out = tmp_path / "scores.jsonl"
    assert main(["score", str(trained_rm), str(rm_data["rows"]), "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and {"source", "reward", "normalized"} <= rows[0].keys()
    assert rows[0]["reward"] > rows[1]["reward"]  # the answer outscores the refusal
    assert main(["score", str(trained_rm), str(rm_data["eval"])]) == 0
    err = capsys.readouterr().err
    accuracy = float(err.split("pair accuracy ")[1].split("%")[0])
    assert accuracy >= 90  # held-out prompts


def test_score_cuts_overlong_rows_as_rm_training_does(trained_rm, tiny_tokenizer, tmp_path, caplog):
    from posttrain.data.pairs import response_renderer, tokenize_response
    from posttrain.data.prepare import truncate
    from posttrain.data.schema import Message
    from posttrain.model.reward import load_reward_model
    from posttrain.train.rm import score_sequences

    long_answer = " ".join(["321"] * 40)
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "reverse 123", "completion": long_answer}) + "\n"
                    + json.dumps({"prompt": "reverse " + "9" * 200, "completion": "9"}) + "\n")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "reverse 123", "chosen": long_answer, "rejected": "I do not know."}) + "\n")
    caplog.set_level("WARNING")
    assert main(["score", str(trained_rm), str(rows), "--cutoff-len", "24", "--output", str(tmp_path / "r.jsonl")
                 ]) == 0
    [row] = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert "2 rows were longer than --cutoff-len 24 and cut to their first 24 tokens" in caplog.text
    assert "1 rows left out of the scores" in caplog.text and "rows.jsonl:2" in caplog.text
    # The reward is the one the RM was trained to give such a row: its FIRST 24 tokens, read at the cut.
    seq = tokenize_response(response_renderer(tiny_tokenizer, None), [Message("user", "reverse 123")],
                            Message("assistant", long_answer), None, "")
    assert len(seq.input_ids) > 24
    model = load_reward_model(str(trained_rm), device=torch.device("cpu"))
    [want] = score_sequences(model, [truncate(seq, 24)], pad_id=tiny_tokenizer.pad_token_id,
                             device=torch.device("cpu"), batch_size=1).tolist()
    assert row["source"].endswith("rows.jsonl:1") and row["reward"] == pytest.approx(want, abs=1e-5)
    # A pair file goes through the same rule: the same response gets the same reward.
    assert main(["score", str(trained_rm), str(pairs), "--cutoff-len", "24", "--output", str(tmp_path / "p.jsonl")
                 ]) == 0
    [pair] = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert pair["chosen"] == pytest.approx(want, abs=1e-5)
    # Without --cutoff-len, rows are cut where the RM was trained to read them (its cutoff_len, 64).
    caplog.clear()
    assert main(["score", str(trained_rm), str(rows)]) == 0
    assert "2 rows were longer than --cutoff-len 64 and cut to their first 64 tokens" in caplog.text


def test_lora_rm_trains_the_head_and_saves_one_merged_folder(tiny_model_dir, rm_data, tmp_path):
    out = tmp_path / "rm-lora"
    assert main(["rm", *rm_overrides(tiny_model_dir, rm_data, out, finetuning_type="lora", lora_rank=8,
                                     learning_rate=3e-3, max_steps=16, eval_steps=16)]) == 0
    assert not (out / "adapter_config.json").exists()
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert not any("lora" in n for n, _ in model.named_parameters())
    [final] = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if "eval_loss" in l]
    assert final["eval_accuracy"] >= 0.9 and final["eval_loss"] < 0.6


def test_rm_refuses_prompt_learning(tiny_model_dir, rm_data, tmp_path, capsys):
    assert main(["rm", *rm_overrides(tiny_model_dir, rm_data, tmp_path / "x", finetuning_type="ptuning")]) == 2
    assert "not available for rm" in capsys.readouterr().err


def test_lm_coefficient_adds_the_chosen_nll_of_the_starting_causal_lm(tiny_model_dir, tiny_tokenizer):
    """With lm_coefficient the loss is Bradley-Terry plus c times the per-token NLL of the chosen response,
    read from the same forward pass through the LM head: the very NLL the causal LM itself gives."""
    from posttrain.data.pairs import collate_pairs, response_renderer, tokenize_pairs
    from posttrain.data.schema import Message, Preference
    from posttrain.model.loading import load_model
    from posttrain.model.reward import language_model_head, load_reward_model
    from posttrain.train.logps import sequence_logps
    from posttrain.train.rm import PairwiseRewardObjective

    cpu = torch.device("cpu")
    pairs = [Preference([Message("user", f"reverse {w}")], Message("assistant", w[::-1]), Message("assistant", w))
             for w in ("123", "4567", "89")]
    batch = collate_pairs(tokenize_pairs(pairs, response_renderer(tiny_tokenizer, None), cutoff_len=64)[0],
                          tiny_tokenizer.pad_token_id)
    rm = load_reward_model(str(tiny_model_dir), device=cpu)
    plain = PairwiseRewardObjective(rm)(batch)
    with_lm = PairwiseRewardObjective(rm, lm_coefficient=0.5, lm_head=language_model_head(rm, str(tiny_model_dir),
                                                                                          device=cpu))(batch)
    logps, counts = sequence_logps(load_model(str(tiny_model_dir), device=cpu), batch)
    nll = -(logps[:3] / counts[:3])
    assert "nll/chosen" not in plain["metrics"]
    assert with_lm["metrics"]["nll/chosen"][0].item() == pytest.approx(nll.sum().item(), rel=1e-5)
    assert with_lm["loss_sum"].item() == pytest.approx(plain["loss_sum"].item() + 0.5 * nll.sum().item(), rel=1e-5)


def test_rm_with_lm_coefficient_lowers_the_chosen_nll_and_saves_a_plain_reward_model(tiny_model_dir, rm_data, tmp_path):
    out = tmp_path / "rm-lm"
    assert main(["rm", *rm_overrides(tiny_model_dir, rm_data, out, lm_coefficient=1.0)]) == 0
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in logs if "loss" in r]
    assert train[-1]["nll/chosen"] < train[0]["nll/chosen"]
    [final] = [r for r in logs if "eval_loss" in r]
    assert final["eval_accuracy"] >= 0.95
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert not any("lm_head" in n for n, _ in model.named_parameters())


def test_rm_runs_are_reproducible_from_the_seed(tiny_model_dir, rm_data, tmp_path):
    """The new scalar head is initialised after seeding: the same config trains the same reward model."""
    from safetensors.torch import load_file

    for name in ("a", "b"):
        assert main(["rm", *rm_overrides(tiny_model_dir, rm_data, tmp_path / name, max_steps=2, eval_steps=2)]) == 0
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lm_coefficient_refuses_a_reward_model_folder_without_an_lm_head(tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from posttrain.errors import ConfigError
    from posttrain.model.reward import language_model_head, load_reward_model

    folder = tmp_path / "untied-rm"
    LlamaForSequenceClassification(LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_labels=1, tie_word_embeddings=False)).save_pretrained(folder)
    rm = load_reward_model(str(folder), device=torch.device("cpu"))
    with pytest.raises(ConfigError, match="no LM output layer"):
        language_model_head(rm, str(folder), device=torch.device("cpu"))


def test_ppo_reward_renders_and_cuts_as_the_reward_model_was_trained(tiny_model_dir, rm_data, tmp_path):
    """PPO's reward-model reward and `posttrain score` read the RM's own template and cutoff_len, whatever
    template the RL run renders its prompts with (they once drifted apart)."""
    from posttrain.data.prompts import Prompt
    from posttrain.data.schema import Message
    from posttrain.score import run_score
    from posttrain.train.rl.rewards import CompletionBatch, ModelReward

    out = tmp_path / "rm-llama3"
    assert main(["rm", *rm_overrides(tiny_model_dir, rm_data, out, max_steps=4, template="llama3", cutoff_len=160)]) == 0
    rows = [("reverse 123", "321"), ("reverse 123", "I do not know."), ("reverse 1234", "4321" * 80)]  # cut
    data = write_jsonl([{"prompt": p, "completion": c} for p, c in rows], tmp_path / "rows.jsonl")
    expected = [r["normalized"] for r in run_score(str(out), str(data))["scores"]]
    reward = ModelReward(str(out), torch.device("cpu"), batch_size=2)
    prompts = [Prompt(messages=[Message("user", p)], raw=p, source=f"row{i}") for i, (p, _) in enumerate(rows)]
    got = reward(CompletionBatch(prompts, [c for _, c in rows]))
    assert got == pytest.approx(expected, abs=1e-5)
