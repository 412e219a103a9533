"""`posttrain <command> [config.yaml] [key=value ...]`: parse, validate, dispatch. Nothing else."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import warnings

from posttrain.errors import PosttrainError


def setup_logging() -> None:
    quiet = int(os.environ.get("RANK", "0")) != 0
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="[posttrain] %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    # Library deprecation chatter (transformers 5 renames, PEFT's notes) is not the user's business.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message="Position ids are not supported for parameter efficient tuning")
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def cmd_sft(a) -> None:
    from posttrain.config import load_config
    from posttrain.train.sft import run_sft

    result = run_sft(load_config("sft", a.config, a.overrides))
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"done: {result.global_step} steps, final loss {result.train_loss:.4f}"
              + (f", eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else ""))
        print(f"model: {result.output_dir}\nmetrics: {result.output_dir / 'metrics.jsonl'}"
              + (f"\nplot: {result.plot}" if result.plot else ""))


def _train_stage(stage: str, a) -> None:
    """rm / dpo / kto: load the stage's config, run it, print where everything went."""
    from posttrain.config import load_config

    if stage == "rm":
        from posttrain.train.rm import run_rm as run
    elif stage == "dpo":
        from posttrain.train.dpo import run_dpo as run
    else:
        from posttrain.train.kto import run_kto as run
    result = run(load_config(stage, a.config, a.overrides))
    if int(os.environ.get("RANK", "0")) == 0:
        last = {k: v for r in result.metrics for k, v in r.items()}  # the latest value of each metric
        shown = ", ".join(f"{k} {last[k]:.4f}" for k in ("eval_accuracy", "eval_rewards/accuracy", "eval_margin",
                                                          "eval_rewards/margin") if k in last)
        print(f"done: {result.global_step} steps, final loss {result.train_loss:.4f}"
              + (f", eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else "")
              + (f", {shown}" if shown else ""))
        print(f"model: {result.output_dir}\nmetrics: {result.output_dir / 'metrics.jsonl'}"
              + (f"\nplot: {result.plot}" if result.plot else ""))


def cmd_rl(stage: str, a) -> None:
    """ppo / grpo: the RL stage; prints the reward before and after and where everything went."""
    from posttrain.config import load_config
    from posttrain.train.rl.recipe import run_rl

    result = run_rl(load_config(stage, a.config, a.overrides))
    if int(os.environ.get("RANK", "0")) == 0:
        evals = [r["eval_reward"] for r in result.metrics if "eval_reward" in r]
        train = [r["reward_mean"] for r in result.metrics if "reward_mean" in r]
        line = f"done: {result.global_step} steps"
        if train:
            line += f", reward (last step) {train[-1]:.4f}"
        if len(evals) >= 2:
            line += f", held-out reward {evals[0]:.4f} -> {evals[-1]:.4f}"
        print(line)
        print(f"model: {result.output_dir}\nmetrics: {result.output_dir / 'metrics.jsonl'}"
              + (f"\nplot: {result.plot}" if result.plot else ""))


def _flag_command_config(command: str, a):
    """serve / score / chat / compare: `[config.yaml] [POSITIONAL ...] [key=value ...] [--flags]` into the
    command's typed config. A positional or a --flag sets its key as key=value would."""
    from posttrain.config import FLAG_COMMANDS, load_config
    from posttrain.errors import ConfigError

    words = ([a.config] if a.config else []) + list(a.overrides)
    path = words.pop(0) if words and words[0].endswith((".yaml", ".yml")) else None
    positional, overrides, values = list(a.positional_keys), [], {}
    for word in words:
        if "=" in word:
            overrides.append(word)
        elif positional:
            values[positional.pop(0)] = word
        else:
            raise ConfigError(f"unexpected argument {word!r}: posttrain {command} takes "
                              f"{' '.join(k.upper() for k in a.positional_keys) or 'no positional'} and key=value")
    for key in FLAG_COMMANDS[command].model_fields:
        flagged = getattr(a, key, None)
        if flagged is not None:
            if key in values:
                raise ConfigError(f"{key} is given twice on the command line; keep one")
            values[key] = flagged
    return load_config(command, path, overrides, values=values)


def cmd_score(a) -> None:
    from posttrain.score import run_score

    c = _flag_command_config("score", a)
    summary = run_score(c.model, c.data, c.output, template=c.template, batch_size=c.batch_size,
                        cutoff_len=c.cutoff_len, trust_remote_code=c.trust_remote_code)
    if not c.output:
        for row in summary["scores"]:
            print(json.dumps(row))
    line = f"scored {summary['rows']} rows ({summary['scored_by']}): mean reward {summary['reward_mean']:.4f}"
    if "pair_accuracy" in summary:
        line += f", pair accuracy {summary['pair_accuracy']:.1%} (chosen scored above rejected)"
    print(line + (f"; scores in {c.output}" if c.output else ""), file=sys.stderr)


def cmd_quickstart(a) -> None:
    from posttrain.quickstart import run_quickstart

    run_quickstart(a.output_dir, fast=a.fast, seed=a.seed)


def cmd_compare(a) -> None:
    from posttrain.compare import run_compare

    c = _flag_command_config("compare", a)
    run_compare(c.output_dir, methods=c.methods, steps=c.steps, base=c.base, batch_size=c.batch_size, data=c.data,
                template=c.template)


def cmd_init_model(a) -> None:
    from pathlib import Path

    from posttrain.errors import ConfigError
    from posttrain.model.tiny import write_tiny_model

    out = Path(a.output_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{a.output_dir!r} already exists and is not an empty folder; init-model writes a new "
                          "model only into a new or empty folder")
    path = write_tiny_model(a.output_dir, size=a.size, seed=a.seed)
    print(f"wrote a {a.size} Llama model and tokenizer to {path}")


def cmd_chat(a) -> None:
    from posttrain.chat_command import run_chat

    c = _flag_command_config("chat", a)
    run_chat(c.model, prompt=c.prompt, system=c.system, template=c.template, max_new_tokens=c.max_new_tokens,
             temperature=c.temperature, trust_remote_code=c.trust_remote_code, adapter=c.adapter)


def cmd_export(a) -> None:
    from posttrain.config import load_config
    from posttrain.export import run_export

    out = run_export(load_config("export", a.config, a.overrides))
    print(f"merged model written to {out}")


def cmd_serve(a) -> None:
    from posttrain.serve.server import run_server

    config = _flag_command_config("serve", a)
    if os.environ.get("POSTTRAIN_API_KEY"):
        config.api_key = [*config.api_key, os.environ["POSTTRAIN_API_KEY"]]
    run_server(config)


def cmd_config(a) -> None:
    from posttrain.config_reference import reference_yaml

    sys.stdout.write(reference_yaml(a.of, a.config, a.overrides))


def cmd_board(a) -> None:
    from posttrain.board.app import run_board

    run_board(a.runs_dir, host=a.host, port=a.port, api_key=a.api_key or os.environ.get("POSTTRAIN_API_KEY"),
              allow_launch=a.allow_launch)


def cmd_data_preview(a) -> None:
    from posttrain.data.preview import STAGES, preview_row
    from posttrain.errors import ConfigError
    from posttrain.model.loading import load_tokenizer

    if a.index < 0:
        raise ConfigError(f"--index {a.index}: rows count from 0")
    # a preview writes nothing, and (RL) scores nothing
    config = _inspected_config(a, STAGES, "has no data to preview", a.overrides, {"output_dir": "."})
    tokenizer = load_tokenizer(config.model_name_or_path, config.trust_remote_code)
    print(preview_row(config.stage, config, tokenizer, a.index, color=sys.stdout.isatty() and not a.no_color))


def _inspected_config(a, stages, refusal: str, overrides: list[str], defaults: dict):
    """A training config read to be looked at, not run (data preview, plan): its stage from --stage, else the file's
    `stage:` key, else sft; `defaults` fill what that needs no value for (and RL gets a reward it will not call)."""
    from pathlib import Path

    import yaml

    from posttrain.config import load_config
    from posttrain.errors import ConfigError

    stage = a.stage
    if stage is None and a.config and Path(a.config).is_file():
        try:
            stage = (yaml.safe_load(Path(a.config).read_text()) or {}).get("stage")
        except (yaml.YAMLError, AttributeError):
            stage = None  # load_config says what is wrong with the file
    guessed = stage is None
    stage = stage or "sft"
    if stage not in stages:
        raise ConfigError(f"stage {stage!r} {refusal}; use one of {', '.join(stages)}")
    if stage in ("ppo", "grpo"):
        defaults = {**defaults, "reward_funcs": ["exact_match"]}
    try:
        return load_config(stage, a.config, overrides, defaults=defaults)
    except ConfigError as err:
        foreign = [set(m.split(" / ")) for m in re.findall(r"is for ([\w /]+), not for sft", str(err))]
        if guessed and foreign:  # another stage's file without its `stage:` key, read as sft's
            fits = [st for st in stages if all(st in keys for keys in foreign)] or sorted(set.union(*foreign))
            raise ConfigError(f"{a.config or 'the config'} has no `stage:` key and is read as sft's, but its keys are "
                              f"for {' or '.join(fits)}: add `stage: {fits[0]}` to it (or pass --stage "
                              f"{fits[0]}){'' if len(fits) == 1 else ', or another of these'}") from None
        raise


def cmd_plan(a) -> None:
    from posttrain.errors import ConfigError
    from posttrain.train.memory_plan import TRAINING_STAGES, print_plan

    # torchrun's own names for the process counts, as flags or key=value (they are not config keys)
    launch = {"nproc_per_node": a.nproc_per_node, "nnodes": a.nnodes}
    overrides = []
    for word in a.overrides:
        key, _, value = word.partition("=")
        if key in launch:
            launch[key] = int(value) if value.isdigit() else -1
        else:
            overrides.append(word)
    for key, value in launch.items():
        if value is not None and value < 1:
            raise ConfigError(f"{key} is a number of processes (1 or more), got {value if value >= 0 else 'no number'}")
    # a plan reads no data and writes nothing
    config = _inspected_config(a, TRAINING_STAGES, "is not a training stage", overrides,
                               {"output_dir": ".", "dataset": "."})
    print_plan(config, nproc_per_node=launch["nproc_per_node"], nnodes=launch["nnodes"] or 1)


def _add_flag_command(sub, command: str, text: str, positional_keys: tuple[str, ...] = ()):
    """A subcommand taking `[config.yaml] [POSITIONAL ...] [key=value ...]`, and each key of its config as a
    --flag (help from the key's description; values are checked by the config, like key=value ones)."""
    from typing import get_origin

    from posttrain.config import FLAG_COMMANDS, flag_name

    cls = FLAG_COMMANDS[command]
    shown = " ".join(f"[{k.upper()}]" for k in positional_keys)
    s = sub.add_parser(command, help=text, description=text,
                       usage=f"posttrain {command} [config.yaml] {shown + ' ' if shown else ''}[key=value ...] "
                             f"[--KEY VALUE ...]")
    s.add_argument("config", nargs="?", help="YAML config (optional: every key can be given as key=value or --flag)")
    s.add_argument("overrides", nargs="*", help=f"{shown + ', then ' if shown else ''}key=value overrides")
    for key, field in cls.model_fields.items():
        flag, description = flag_name(key), (field.description or "").replace("%", "%%")
        metavar = flag[2:].upper().replace("-", "_")
        if field.annotation is bool:
            s.add_argument(flag, dest=key, action="store_true", default=None, help=description)
        elif get_origin(field.annotation) in (list, dict):
            s.add_argument(flag, dest=key, action="append", metavar=metavar, help=description + " (repeatable)")
        else:
            s.add_argument(flag, dest=key, metavar=metavar, help=description)
    s.set_defaults(positional_keys=positional_keys)
    return s


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="posttrain", description="Post-training for language models.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sft", help="supervised fine-tuning / continued pre-training")
    s.add_argument("config", nargs="?", help="YAML config (optional: every key can be given as key=value)")
    s.add_argument("overrides", nargs="*", help="key=value overrides, e.g. learning_rate=1e-4")
    s.set_defaults(func=cmd_sft)

    for stage, text in (("rm", "reward model on preference pairs (Bradley-Terry)"),
                        ("dpo", "preference optimization: DPO, IPO, hinge, robust, BCO, SimPO, ORPO (pref_loss)"),
                        ("kto", "KTO on unpaired rows (response + true/false label)")):
        s = sub.add_parser(stage, help=text)
        s.add_argument("config", nargs="?", help="YAML config (optional: every key can be given as key=value)")
        s.add_argument("overrides", nargs="*", help="key=value overrides, e.g. pref_beta=0.1")
        s.set_defaults(func=lambda a, stage=stage: _train_stage(stage, a))

    for stage, text in (("ppo", "RLHF: PPO with a critic (advantage_estimator: gae), or any estimator below"),
                        ("grpo", "RL without a critic: GRPO, Dr.GRPO, RLOO, REINFORCE++ (advantage_estimator)")):
        s = sub.add_parser(stage, help=text)
        s.add_argument("config", nargs="?", help="YAML config (optional: every key can be given as key=value)")
        s.add_argument("overrides", nargs="*", help="key=value overrides, e.g. reward_funcs=[exact_match]")
        s.set_defaults(func=lambda a, stage=stage: cmd_rl(stage, a))

    s = _add_flag_command(sub, "score", "score prompt/response rows (or chosen/rejected pairs) with a reward model",
                          ("model", "data"))
    s.set_defaults(func=cmd_score)

    s = sub.add_parser("quickstart", help="teach a tiny local model a task end to end (no downloads)")
    s.add_argument("--output-dir", "--output_dir", default="runs/quickstart")  # HF TrainingArguments spells it so
    s.add_argument("--fast", action="store_true", help="a much shorter run (for smoke tests)")
    s.add_argument("--seed", type=int, default=0, help="the tiny model's initial weights, the data and every stage")
    s.set_defaults(func=cmd_quickstart)

    s = _add_flag_command(sub, "compare", "full vs LoRA vs P-tuning on the embedded task or your own data: one "
                                          "measured table")
    s.set_defaults(func=cmd_compare)

    s = sub.add_parser("init-model", help="write the tiny default model + tokenizer as an HF folder")
    s.add_argument("output_dir")
    s.add_argument("--size", default="tiny", choices=["tiny", "small"])
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_init_model)

    s = sub.add_parser("export", help="merge a LoRA adapter into its base: a standalone HF model folder")
    s.add_argument("config", nargs="?", help="YAML config (optional: every key can be given as key=value)")
    s.add_argument("overrides", nargs="*", help="adapter_name_or_path=... export_dir=... [model_name_or_path=...]")
    s.set_defaults(func=cmd_export)

    s = _add_flag_command(sub, "chat", "chat with a model folder (interactive, or one-shot with --prompt)", ("model",))
    s.set_defaults(func=cmd_chat)

    s = _add_flag_command(sub, "serve", "OpenAI-compatible server: one base model, many adapters", ("model",))
    s.set_defaults(func=cmd_serve)

    from posttrain.config import COMMANDS

    s = sub.add_parser("config", help="print every key of a command with its default (or its value in a config) "
                                      "and what it does, as YAML")
    s.add_argument("of", metavar="COMMAND", choices=list(COMMANDS), help=", ".join(COMMANDS))
    s.add_argument("config", nargs="?", help="a config file of that command: its values instead of the defaults, "
                                             "under its leading comments")
    s.add_argument("overrides", nargs="*", help="key=value overrides")
    s.set_defaults(func=cmd_config)

    s = sub.add_parser("board", help="web page over run folders: runs, live curves, RL rollouts, alarms, chat")
    s.add_argument("runs_dir", nargs="?", default="runs", help="folder to find runs in (any folder below holding a "
                                                                "metrics.jsonl; default: runs)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8001)
    s.add_argument("--api-key", help="require this key on every route (also read from $POSTTRAIN_API_KEY)")
    s.add_argument("--allow-launch", action="store_true",
                   help="let the page start training runs into RUNS_DIR (off: the board only reads)")
    s.set_defaults(func=cmd_board)

    s = sub.add_parser("plan", help="per-rank memory of a training config (weights, gradients, optimizer, "
                                    "activations) against the memory there is, before anything loads")
    s.add_argument("config", nargs="?", help="the training config (YAML); its stage key picks the stage")
    s.add_argument("overrides", nargs="*", help="key=value overrides, and nproc_per_node=N nnodes=N as torchrun takes")
    s.add_argument("--stage", choices=["sft", "rm", "dpo", "kto", "ppo", "grpo"],
                   help="the stage the config is for (default: its stage key, else sft)")
    s.add_argument("--nproc-per-node", type=int, help="processes per node, as torchrun (default: $WORLD_SIZE or 1)")
    s.add_argument("--nnodes", type=int, help="nodes, as torchrun (default 1)")
    s.set_defaults(func=cmd_plan)

    s = sub.add_parser("data", help="inspect data")
    dsub = s.add_subparsers(dest="data_command", required=True)
    d = dsub.add_parser("preview", help="print one rendered sample with its trained tokens marked")
    d.add_argument("config", nargs="?")
    d.add_argument("overrides", nargs="*")
    d.add_argument("--index", type=int, default=0, help="which sample (default 0)")
    d.add_argument("--stage", choices=["sft", "rm", "dpo", "kto", "ppo", "grpo"],
                   help="how the rows are read and trained (default: the config's stage key, else sft)")
    d.add_argument("--no-color", action="store_true")
    d.set_defaults(func=cmd_data_preview)
    return p


def _split_config_arg(a) -> None:
    """`posttrain sft lr=1e-4 ...` without a YAML: the first positional is an override, not a file."""
    if getattr(a, "config", None) and "=" in a.config and not a.config.endswith((".yaml", ".yml")):
        a.overrides = [a.config] + list(a.overrides)
        a.config = None


def _end_open_runs(status: str, error: str) -> None:
    """A run this command started and did not finish says how it ended in its run_status.json (the board reads it)."""
    if "posttrain.train.reporting" in sys.modules:  # no training started otherwise
        sys.modules["posttrain.train.reporting"].end_open_runs(status, error)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides (and serve's / score's / chat's positionals) may come after options
    # (`data preview cfg.yaml --index 2 template=llama3`, `score --batch-size 4 RM DATA`).
    positional = bool(getattr(args, "positional_keys", ()))
    if extra and hasattr(args, "overrides") and all(("=" in e or positional) and not e.startswith("-")
                                                    for e in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _split_config_arg(args)
    setup_logging()
    try:
        args.func(args)
    except PosttrainError as err:
        _end_open_runs("failed", str(err))
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _end_open_runs("killed", "interrupted")
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
