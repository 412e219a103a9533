"""Bad input, command by command: one table. Each case must end with one clear line on stderr
(`error: ...` naming the problem), exit code 2, no traceback, and no output folder written or changed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from posttrain.cli import main

GOOD_ROW = {"messages": [{"role": "user", "content": "reverse 12"}, {"role": "assistant", "content": "21"}]}


def _jsonl(path: Path, *lines: str) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _good(path: Path) -> Path:
    return _jsonl(path, *[json.dumps(GOOD_ROW)] * 8)


# Each case: (command, extra key=value / argv items, expected fragment). `setup(tmp)` writes the files a case
# names as {tmp}/..., and the runner fills in a small valid base config around the extra items.
def _nested(tmp: Path) -> None:
    _jsonl(tmp / "nested.jsonl", '{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}")


def _bigint(tmp: Path) -> None:
    _jsonl(tmp / "bigint.jsonl", '{"messages": [{"role": "user", "content": ' + "9" * 5000 + "}]}")


def _duplicate_key(tmp: Path) -> None:
    row = json.dumps(GOOD_ROW)
    _jsonl(tmp / "dup.jsonl", row[:-1] + ', "messages": []}')


def _dangling(tmp: Path) -> None:
    (tmp / "folder").mkdir()
    _good(tmp / "folder" / "a.jsonl")
    os.symlink(tmp / "gone.jsonl", tmp / "folder" / "b.jsonl")


def _loop(tmp: Path) -> None:
    (tmp / "folder").mkdir()
    _good(tmp / "folder" / "a.jsonl")
    os.symlink(tmp / "folder", tmp / "folder" / "again")


def _bad_template(tmp: Path) -> None:
    (tmp / "bad.jinja").write_text("{% for m in messages %}{{ m.content }\n")


def _file_output(tmp: Path) -> None:
    (tmp / "out").write_text("not a folder")


def _foreign_output(tmp: Path) -> None:
    (tmp / "out").mkdir()
    (tmp / "out" / "thesis.tex").write_text("mine")


def _only_desirable(tmp: Path) -> None:
    row = {"prompt": "reverse 12", "completion": "21", "label": True}
    _jsonl(tmp / "kto.jsonl", *[json.dumps(row)] * 8)


def _pairs(tmp: Path) -> None:
    row = {"prompt": "reverse 12", "chosen": "21", "rejected": "12"}
    _jsonl(tmp / "pairs.jsonl", *[json.dumps(row)] * 8)


def _existing_model(tmp: Path) -> None:
    (tmp / "out").mkdir()
    (tmp / "out" / "config.json").write_text("{}")


CASES = [
    # (id, command, setup, extra, fragment)
    ("lr-inf", "sft", None, ["learning_rate=.inf"], "finite number"),
    ("lr-nan", "sft", None, ["learning_rate=.nan"], "finite number"),
    ("max-steps-0", "sft", None, ["max_steps=0"], "max_steps must be a positive number"),
    ("max-steps-negative", "sft", None, ["max_steps=-5"], "max_steps must be a positive number"),
    ("lora-key-with-full", "sft", None, ["lora_rank=16"], "finetuning_type is 'full', which ignores it"),
    ("prompt-key-with-lora", "sft", None, ["finetuning_type=lora", "num_virtual_tokens=4"], "which ignores it"),
    ("override-bad-yaml", "sft", None, ["learning_rate=[1"], "not valid YAML"),
    ("override-into-scalar", "sft", None, ["learning_rate=1", "learning_rate.x=2"], "has no sub-keys"),
    ("override-empty-key", "sft", None, ["a..b=1"], "is not a key name"),
    ("deeply-nested-json", "sft", _nested, ["dataset={tmp}/nested.jsonl"], "nested.jsonl:1: nested too deeply"),
    ("5000-digit-int", "sft", _bigint, ["dataset={tmp}/bigint.jsonl"], "bigint.jsonl:1: a number has more than"),
    ("duplicate-json-key", "sft", _duplicate_key, ["dataset={tmp}/dup.jsonl"], "key 'messages' appears twice"),
    ("dangling-symlink", "sft", _dangling, ["dataset={tmp}/folder"], "b.jsonl: is a broken symbolic link"),
    ("symlink-loop", "sft", _loop, ["dataset={tmp}/folder"], "a loop"),
    ("template-syntax", "sft", _bad_template, ["template={tmp}/bad.jinja"], "does not parse"),
    ("output-is-file", "sft", _file_output, [], "is a file"),
    ("output-not-ours", "sft", _foreign_output, ["overwrite_output_dir=true"], "'thesis.tex'"),
    ("output-is-base-model", "sft", _existing_model, ["overwrite_output_dir=true"], "did not write"),
    ("kto-no-undesirable", "kto", _only_desirable, ["dataset={tmp}/kto.jsonl", "ref_cache_dir={tmp}/cache"],
     "no undesirable (label: false) rows"),
    ("dpo-output-is-file", "dpo", lambda t: (_pairs(t), _file_output(t)),
     ["dataset={tmp}/pairs.jsonl", "ref_cache_dir={tmp}/cache"], "is a file"),
    ("rm-lr-nan", "rm", _pairs, ["dataset={tmp}/pairs.jsonl", "learning_rate=.nan"], "finite number"),
    ("grpo-bad-override", "grpo", None, ["reward_funcs=[exact_match]", "temperature=[1"], "not valid YAML"),
    ("grpo-temperature-inf", "grpo", None, ["reward_funcs=[exact_match]", "temperature=.inf"], "finite number"),
    ("grpo-trainer-ranks-without-ray", "grpo", None, ["reward_funcs=[exact_match]", "ray_trainer_ranks=2"],
     "ray_trainer_ranks places the trainer's ranks with Ray: set placement: ray"),
    ("grpo-trainer-ranks-half-gpu", "grpo", None, ["reward_funcs=[exact_match]", "placement=ray",
     "ray_trainer_ranks=2", "ray_num_gpus_per_role=0.5"], "each rank trains on one whole GPU"),
    ("grpo-separate-roles-without-ranks", "grpo", None, ["reward_funcs=[exact_match]", "placement=ray",
     "ray_separate_roles=true"], "ray_separate_roles places the roles beside the trainer's Ray ranks"),
]


def _argv(command: str, extra: list[str], tmp: Path, model: Path) -> list[str]:
    base = {"model_name_or_path": str(model), "dataset": str(_good(tmp / "good.jsonl")), "output_dir": str(tmp / "out"),
            "max_steps": "2", "cutoff_len": "64", "disable_tqdm": "true", "save_steps": "0"}
    given = [e.format(tmp=tmp) for e in extra]
    keys = {g.split("=", 1)[0] for g in given}
    return [command, *[f"{k}={v}" for k, v in base.items() if k not in keys], *given]


def _snapshot(folder: Path) -> dict[str, bytes] | None:
    if not folder.exists():
        return None
    if folder.is_file():
        return {"": folder.read_bytes()}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case, command, setup, extra, fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(case, command, setup, extra, fragment, tiny_model_dir, tmp_path, capsys):
    if setup is not None:
        setup(tmp_path)
    before = _snapshot(tmp_path / "out")
    assert main(_argv(command, extra, tmp_path, tiny_model_dir)) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and fragment in lines[0], err
    assert _snapshot(tmp_path / "out") == before  # nothing written, nothing removed


def _yaml_duplicate(tmp: Path) -> None:
    (tmp / "dup.yaml").write_text("learning_rate: 1.0e-4\nlearning_rate: 1.0\n")


def _yaml_nul_path(tmp: Path) -> None:
    (tmp / "nul.yaml").write_text('dataset: "data\\0.jsonl"\n')


# Commands whose whole argv a case gives ({model}, {tmp}, {good} filled in); nothing may appear under {tmp}/out.
ARGV_CASES = [
    ("yaml-duplicate-key", _yaml_duplicate, ["sft", "{tmp}/dup.yaml", "model_name_or_path={model}", "dataset={good}",
                                             "output_dir={tmp}/out"], "key 'learning_rate' is given twice"),
    ("yaml-nul-in-path", _yaml_nul_path, ["sft", "{tmp}/nul.yaml", "model_name_or_path={model}",
                                          "output_dir={tmp}/out"], "contains a NUL byte"),
    ("path-too-long", None, ["sft", "model_name_or_path={model}", "dataset={good}", "output_dir={tmp}/" + "o" * 300],
     "too long for a path"),
    ("score-a-causal-lm", None, ["score", "{model}", "{good}", "--output", "{tmp}/out"], "not a reward model"),
    # RL would put a random head on it and train on noise
    ("ppo-reward-model-a-causal-lm", None, ["ppo", "model_name_or_path={model}", "dataset={good}",
                                            "reward_model={model}", "output_dir={tmp}/out"], "not a reward model"),
    ("preview-index-past-the-end", None, ["data", "preview", "model_name_or_path={model}", "dataset={good}",
                                          "--index", "50"], "the data has only 8 usable rows"),
    ("preview-negative-index", None, ["data", "preview", "model_name_or_path={model}", "dataset={good}",
                                      "--index", "-1"], "rows count from 0"),
    ("init-model-into-a-file", lambda t: (t / "file").write_text("x"), ["init-model", "{tmp}/file"],
     "not an empty folder"),
]


@pytest.mark.parametrize("case, setup, argv, fragment", ARGV_CASES, ids=[c[0] for c in ARGV_CASES])
def test_bad_command_line_is_one_clear_line(case, setup, argv, fragment, tiny_model_dir, tmp_path, capsys):
    if setup is not None:
        setup(tmp_path)
    good = _good(tmp_path / "good.jsonl")
    assert main([a.format(tmp=tmp_path, model=tiny_model_dir, good=good) for a in argv]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], err
    assert not (tmp_path / "out").exists()


def test_init_model_refuses_a_folder_that_holds_anything(tmp_path, capsys):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"mine": true}')
    assert main(["init-model", str(tmp_path / "model")]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert (tmp_path / "model" / "config.json").read_text() == '{"mine": true}'


def test_export_refuses_an_export_dir_it_did_not_write(tiny_model_dir, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    assert main(["sft", *_argv("sft", ["finetuning_type=lora", f"output_dir={adapter}"], tmp_path,
                               tiny_model_dir)[1:]]) == 0
    capsys.readouterr()
    target = tmp_path / "merged"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    args = [f"adapter_name_or_path={adapter}", f"export_dir={target}", "overwrite_output_dir=true"]
    assert main(["export", *args]) == 2
    assert "'keep.txt'" in capsys.readouterr().err and (target / "keep.txt").read_text() == "mine"
    (target / "keep.txt").unlink()
    assert main(["export", *args]) == 0  # an empty folder is fine, and so is replacing an earlier export
    assert main(["export", *args]) == 0
    assert (target / "posttrain_export.yaml").is_file() and (target / "config.json").is_file()
    assert main(["export", *args[:-1]]) == 2
    assert "already holds a posttrain export" in capsys.readouterr().err


@pytest.mark.parametrize("stage", ["sft", "grpo"])
def test_a_diverging_run_stops_and_writes_no_model(stage, tiny_model_dir, tmp_path, capsys):
    extra = ["learning_rate=1e30", "max_steps=6", "logging_steps=5", "save_steps=3"]
    if stage == "grpo":  # a reward that differs between samples, so that there is a gradient
        (tmp_path / "length.py").write_text("def length(prompts, completions, **kw):\n"
                                            "    return [float(len(c)) for c in completions]\n")
        extra += [f"reward_funcs=[{tmp_path}/length.py:length]", "max_completion_length=8", "rollout_batch_size=2",
                  "num_generations=4", "temperature=2.0"]
    assert main(_argv(stage, extra, tmp_path, tiny_model_dir)) == 2
    err = capsys.readouterr().err
    assert "error: training diverged" in err and "Traceback" not in err
    out = tmp_path / "out"
    assert not list(out.glob("*.safetensors")) and not (out / "config.json").exists()
    from safetensors.torch import load_file

    for ckpt in out.glob("checkpoint-*"):  # a checkpoint written before the check holds finite weights only
        assert all(t.isfinite().all() for t in load_file(ckpt / "model.safetensors").values())


def test_the_offline_guard_holds_from_the_first_import():
    """transformers and huggingface_hub read HF_HUB_OFFLINE once, when imported: the CLI imports transformers
    before any model loads, so the guard must be set by importing posttrain itself."""
    import subprocess
    import sys

    from child_env import child_env

    env = {k: v for k, v in child_env().items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    code = ("import posttrain.cli as cli; cli.setup_logging(); import huggingface_hub.constants as c; "
            "print(c.HF_HUB_OFFLINE)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert res.returncode == 0 and res.stdout.strip() == "True", res.stderr
