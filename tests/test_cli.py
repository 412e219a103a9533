"""End to end through the CLI: a run that learns, writes a usable folder, and refuses bad input early."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from posttrain.cli import main

from conftest import sft_overrides
from child_env import child_env


def test_sft_cli_loss_falls_and_writes_a_usable_folder(tiny_model_dir, task_data, tmp_path, capsys):
    out = tmp_path / "run"
    config = tmp_path / "sft.yaml"
    config.write_text(yaml.safe_dump({"model_name_or_path": str(tiny_model_dir), "dataset": str(task_data),
                                      "output_dir": str(out), "val_size": 40, "eval_steps": 20}))
    rest = [o for o in sft_overrides(tiny_model_dir, task_data, out, max_steps=60)
            if not o.startswith(("model_name_or_path", "dataset", "output_dir"))]
    assert main(["sft", str(config), *rest]) == 0
    printed = capsys.readouterr().out
    assert "plot:" in printed and "final loss" in printed

    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert losses[-1] < 0.5 * losses[0]
    assert len(evals) == 3 and evals[-1] < evals[0]
    assert all({"lr", "tokens_per_s", "grad_norm"} <= r.keys() for r in records if "loss" in r)
    assert (out / "training_loss.png").stat().st_size > 1000
    assert yaml.safe_load((out / "posttrain_config.yaml").read_text())["max_steps"] == 60
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]

    # The folder is an ordinary HF model: plain transformers loads it.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(out)
    assert AutoTokenizer.from_pretrained(out).chat_template

    # One-shot chat from the trained folder answers with something.
    res = subprocess.run([sys.executable, "-m", "posttrain", "chat", str(out), "--prompt", "reverse 123",
                          "--max-new-tokens", "8"], capture_output=True, text=True, env=child_env())
    assert res.returncode == 0 and res.stdout.strip()


def test_tokens_per_s_leaves_out_evaluation(tiny_model_dir, task_data, tmp_path, monkeypatch):
    """Evaluation is not training: a slow evaluation does not lower the tokens/s of the window it falls in.
    The loop's clock is a fake one that moves a second per reading and a day per evaluation."""
    import types

    from posttrain.train import loop

    clock = [0.0]

    def perf_counter():
        clock[0] += 1.0
        return clock[0]

    evaluate = loop.Trainer.evaluate

    def slow_evaluate(self, module):
        clock[0] += 86400.0
        return evaluate(self, module)

    monkeypatch.setattr(loop, "time", types.SimpleNamespace(perf_counter=perf_counter))
    monkeypatch.setattr(loop.Trainer, "evaluate", slow_evaluate)
    out = tmp_path / "run"
    assert main(["sft", *sft_overrides(tiny_model_dir, task_data, out, max_steps=20, val_size=40, eval_steps=5)]) == 0
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in records if "eval_loss" in r]) == 4
    rates = [r["tokens_per_s"] for r in records if "loss" in r]
    assert len(rates) == 4 and min(rates) > 10  # a day in a window would read under 1


def test_continued_pretraining_on_text(tiny_model_dir, tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": f"the model reads tokens {i % 7} and learns"}) + "\n"
                            for i in range(64)))
    out = tmp_path / "pt"
    assert main(["sft", *sft_overrides(tiny_model_dir, data, out, max_steps=20, packing=True)]) == 0
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < 0.5 * losses[0]
    assert records[0]["trainable_percent"] == 100  # the parameter summary opens the log


def test_data_preview_marks_trained_spans(tiny_model_dir, task_data, capsys):
    assert main(["data", "preview", f"model_name_or_path={tiny_model_dir}", f"dataset={task_data}",
                 "output_dir=unused", "--no-color"]) == 0
    out = capsys.readouterr().out
    assert "trained" in out and "<|im_end|>]]" in out


@pytest.mark.parametrize("override, message", [
    ("learning_rat=0.1", "unknown config key 'learning_rat' (did you mean 'learning_rate'?)"),
    ("lr_scheduler_type=cosin", "'lr_scheduler_type'"),
    ("per_device_train_batch_size=0", "'per_device_train_batch_size'"),
    ("on_bad_rows=ignore", "'error' or 'skip'"),
    ("report_to=wandb_x", "'report_to'"),
])
def test_bad_config_keys_are_named(tiny_model_dir, task_data, tmp_path, capsys, override, message):
    assert main(["sft", *sft_overrides(tiny_model_dir, task_data, tmp_path / "o"), override]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_hub_id_and_bad_data_fail_before_training(tiny_model_dir, tmp_path, capsys):
    assert main(["sft", *sft_overrides("meta-llama/Llama-3-8B", "x.jsonl", tmp_path / "o")]) == 2
    assert "not a local folder" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                   '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}\n')
    assert main(["sft", *sft_overrides(tiny_model_dir, bad, tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2" in err and "empty" in err
    assert not (tmp_path / "o2").exists()


def test_refuses_to_overwrite_a_finished_run(tiny_model_dir, task_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["sft", *sft_overrides(tiny_model_dir, task_data, out, max_steps=2, save_steps=1)]) == 0
    assert main(["sft", *sft_overrides(tiny_model_dir, task_data, out, max_steps=2)]) == 2
    assert "already holds a posttrain run" in capsys.readouterr().err
    assert (out / "checkpoint-1").is_dir()
    assert main(["sft", *sft_overrides(tiny_model_dir, task_data, out, max_steps=2, overwrite_output_dir=True)]) == 0
    assert not (out / "checkpoint-1").exists()  # the earlier run's entries are replaced, not mixed into


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_never_deletes_what_posttrain_did_not_write(tiny_model_dir, task_data, tmp_path, capsys):
    # The audit's case: output_dir holds the user's base model and data, and the config says overwrite.
    victim = tmp_path / "mine"
    shutil.copytree(tiny_model_dir, victim)
    shutil.copy(task_data, victim / "data.jsonl")
    before = _tree(victim)
    for model, data in ((victim, victim / "data.jsonl"), (tiny_model_dir, task_data)):
        assert main(["sft", *sft_overrides(model, data, victim, max_steps=2, overwrite_output_dir=True)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: output_dir:") and err.count("\n") == 1
        assert _tree(victim) == before

    # A posttrain run folder the user added a file to: refused as well, the file kept.
    out = tmp_path / "run"
    assert main(["sft", *sft_overrides(tiny_model_dir, task_data, out, max_steps=2)]) == 0
    (out / "notes.txt").write_text("mine")
    assert main(["sft", *sft_overrides(tiny_model_dir, task_data, out, max_steps=2, overwrite_output_dir=True)]) == 2
    assert "'notes.txt'" in capsys.readouterr().err and (out / "notes.txt").read_text() == "mine"

    # An output_dir that is a file, or the folder the data is read from.
    assert main(["sft", *sft_overrides(tiny_model_dir, task_data, task_data, max_steps=2)]) == 2
    assert "is a file" in capsys.readouterr().err
    assert main(["sft", *sft_overrides(tiny_model_dir, task_data, task_data.parent, max_steps=2)]) == 2
    assert "holds dataset" in capsys.readouterr().err


def test_missing_tracker_is_a_clear_error(tiny_model_dir, task_data, tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    assert main(["sft", *sft_overrides(tiny_model_dir, task_data, tmp_path / "o", report_to="wandb")]) == 2
    assert "needs the 'wandb' package" in capsys.readouterr().err


def test_data_preview_shows_each_stage_as_it_trains(tiny_model_dir, tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "reverse 12", "chosen": "21", "rejected": "12"}) + "\n")
    kto = tmp_path / "kto.jsonl"
    kto.write_text("".join(json.dumps({"prompt": f"reverse {n}", "completion": c, "label": ok}) + "\n"
                           for n, c, ok in (("12", "21", True), ("13", "13", False))))
    config = tmp_path / "dpo.yaml"  # the config's own stage picks the preview: no output_dir needed
    config.write_text(yaml.safe_dump({"stage": "dpo", "model_name_or_path": str(tiny_model_dir),
                                      "dataset": str(pairs)}))
    assert main(["data", "preview", str(config), "--no-color"]) == 0
    out = capsys.readouterr().out
    assert "--- chosen:" in out and "[[21<|im_end|>]]" in out and "--- rejected:" in out and "[[12<|im_end|>]]" in out
    assert main(["data", "preview", f"model_name_or_path={tiny_model_dir}", f"dataset={kto}", "--stage", "kto",
                 "--index", "1", "--no-color"]) == 0
    out = capsys.readouterr().out
    assert "undesirable (label: false)" in out and "[[13<|im_end|>]]" in out
    assert main(["data", "preview", f"model_name_or_path={tiny_model_dir}", f"dataset={pairs}", "--stage", "grpo",
                 "--no-color"]) == 0
    out = capsys.readouterr().out
    assert "as generation sees it" in out and out.rstrip().endswith("<|im_start|>assistant") and "[[" not in out


# ---- serve / score / chat / compare: `[config.yaml] [POSITIONAL ...] [key=value ...]` and their --flags ------

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _record(monkeypatch, target: str, returns=None) -> list:
    """Replace the function at `target` with one that records each call's arguments."""
    calls = []
    monkeypatch.setattr(target, lambda *args, **kwargs: calls.append((args, kwargs)) or returns)
    return calls


def test_serve_takes_a_config_file_key_values_and_its_flags(monkeypatch):
    calls = _record(monkeypatch, "posttrain.serve.server.run_server")
    monkeypatch.delenv("POSTTRAIN_API_KEY", raising=False)
    assert main(["serve", str(EXAMPLES / "serve.yaml"), "port=9001", "--max-model-len", "64", "--api-key", "k"]) == 0
    config = calls[-1][0][0]
    assert (config.model, config.adapters, config.port, config.max_model_len, config.api_key) == (
        "runs/quickstart/base-model", {"reverse": "runs/quickstart/sft-lora"}, 9001, 64, ["k"])

    # The README's form: MODEL and flags, the repeatable ones once per item; vLLM's names as aliases.
    monkeypatch.setenv("POSTTRAIN_API_KEY", "env-key")
    assert main(["serve", "models/base", "--adapter-dir", "runs/adapters", "--adapter", "math=runs/lora-math",
                 "--api-key", "k", "--port", "8000", "--adapter", "b=y", "max_num_seqs=4"]) == 0
    config = calls[-1][0][0]
    assert config.adapters == {"math": "runs/lora-math", "b": "y"} and config.adapter_dirs == ["runs/adapters"]
    assert (config.model, config.port, config.max_batch_size, config.api_key) == ("models/base", 8000, 4,
                                                                                  ["k", "env-key"])


def test_score_chat_and_compare_take_positionals_key_values_and_flags(monkeypatch, tmp_path):
    scored = _record(monkeypatch, "posttrain.score.run_score",
                     {"rows": 0, "scored_by": "reward head", "reward_mean": 0.0, "scores": []})
    assert main(["score", "runs/rm", "rows.jsonl", "--output", "scores.jsonl"]) == 0
    assert main(["score", "runs/rm", "--batch-size", "4", "rows.jsonl", "cutoff_len=64"]) == 0
    assert [call[0] for call in scored] == [("runs/rm", "rows.jsonl", "scores.jsonl"), ("runs/rm", "rows.jsonl", None)]
    assert scored[-1][1] == dict(template=None, batch_size=4, cutoff_len=64, trust_remote_code=False)

    chatted = _record(monkeypatch, "posttrain.chat_command.run_chat")
    config = tmp_path / "chat.yaml"  # LLaMA-Factory's names for the model and adapter
    config.write_text("model_name_or_path: models/base\nadapter_name_or_path: runs/lora\ntemperature: 0.5\n")
    assert main(["chat", str(config), "--prompt", "reverse 12345", "max_new_tokens=8"]) == 0
    assert main(["chat", "models/base", "--adapter", "runs/lora"]) == 0
    assert chatted[0] == (("models/base",), dict(prompt="reverse 12345", system=None, template=None,
                                                 max_new_tokens=8, temperature=0.5, trust_remote_code=False,
                                                 adapter="runs/lora"))
    assert chatted[1][1]["adapter"] == "runs/lora" and chatted[1][1]["prompt"] is None

    compared = _record(monkeypatch, "posttrain.compare.run_compare")
    assert main(["compare", "--base", "models/base", "--data", "my_data.jsonl", "--template", "chatml",
                 "--methods", "full,lora", "steps=3"]) == 0
    assert compared[-1] == (("runs/compare",), dict(methods=["full", "lora"], steps=3, base="models/base",
                                                   batch_size=32, data="my_data.jsonl", template="chatml"))


@pytest.mark.parametrize("argv, fragment", [
    (["serve", "m", "--port", "70000"], "config key 'port' (--port): Input should be less than or equal to 65535"),
    (["serve", "m", "--port", "1", "port=2"], "port is given twice on the command line"),
    (["serve", "m", "other"], "unexpected argument 'other'"),
    (["serve", "m", "--dtype", "int8"], "config key 'dtype' (--dtype): Input should be 'auto', 'float32'"),
    (["serve", "--port", "1"], "config key 'model' (--model) is required"),
    (["serve", "m", "max_loras=0"], "config key 'max_loras' (--max-loras): Input should be greater than or equal"),
    (["chat", "m", "tempreature=1"], "unknown config key 'tempreature' (did you mean 'temperature'?)"),
    (["compare", "--methods", "full,qlora"], "unknown method(s) qlora; choose from full, lora"),
    (["score", "rm", "rows.jsonl", "--batch-size", "0"], "config key 'batch_size' (--batch-size)"),
])
def test_serve_score_chat_compare_refuse_bad_settings_in_one_line(argv, fragment, capsys):
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], lines
