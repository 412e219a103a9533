"""`posttrain <command> [config.yaml] [key=value ...]`: parse, validate, dispatch. Nothing else."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from posttrain.errors import PosttrainError


def _setup_logging() -> None:
    quiet = int(os.environ.get("RANK", "0")) != 0
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="[posttrain] %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

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


def cmd_quickstart(a) -> None:
    from posttrain.quickstart import run_quickstart

    run_quickstart(a.output_dir, fast=a.fast)


def cmd_init_model(a) -> None:
    from posttrain.model.tiny import write_tiny_model

    path = write_tiny_model(a.output_dir, size=a.size, seed=a.seed)
    print(f"wrote a {a.size} Llama model and tokenizer to {path}")


def cmd_chat(a) -> None:
    from posttrain.chat import run_chat

    run_chat(a.model, prompt=a.prompt, system=a.system, template=a.template, max_new_tokens=a.max_new_tokens,
             temperature=a.temperature, trust_remote_code=a.trust_remote_code)


def cmd_data_preview(a) -> None:
    from posttrain.config import load_config
    from posttrain.data.chat import preview
    from posttrain.data.formats import DatasetSpec, load_conversations
    from posttrain.data.chat import ChatRenderer
    from posttrain.model.loading import load_tokenizer

    config = load_config("sft", a.config, a.overrides)
    tokenizer = load_tokenizer(config.model_name_or_path, config.trust_remote_code)
    renderer = ChatRenderer(tokenizer, config.template, config.train_on_prompt, config.mask_history)
    specs = [DatasetSpec(path=e.path, weight=e.weight, formatting=e.formatting, columns=e.columns)
             for e in config.dataset_entries()]
    convs, report = load_conversations(specs, config.on_bad_rows, config.seed, max_samples=a.index + 1)
    conv = convs[min(a.index, len(convs) - 1)]
    sample = renderer.tokenize(conv)
    color = sys.stdout.isatty() and not a.no_color
    print(f"--- {conv.source}: {len(sample.input_ids)} tokens, {sample.num_trained} trained "
          f"({'highlighted' if color else 'inside [[ ]]'}) ---")
    print(preview(renderer, conv, color=color))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="posttrain", description="Post-training for language models.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sft", help="supervised fine-tuning / continued pre-training")
    s.add_argument("config", nargs="?", help="YAML config (optional: every key can be given as key=value)")
    s.add_argument("overrides", nargs="*", help="key=value overrides, e.g. learning_rate=1e-4")
    s.set_defaults(func=cmd_sft)

    s = sub.add_parser("quickstart", help="teach a tiny local model a task end to end (no downloads)")
    s.add_argument("--output-dir", default="runs/quickstart")
    s.add_argument("--fast", action="store_true", help="a much shorter run (for smoke tests)")
    s.set_defaults(func=cmd_quickstart)

    s = sub.add_parser("init-model", help="write the tiny default model + tokenizer as an HF folder")
    s.add_argument("output_dir")
    s.add_argument("--size", default="tiny", choices=["tiny", "small"])
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_init_model)

    s = sub.add_parser("chat", help="chat with a model folder (interactive, or one-shot with --prompt)")
    s.add_argument("model")
    s.add_argument("--prompt", help="answer this one message and exit")
    s.add_argument("--system")
    s.add_argument("--template", help="built-in chat template name or .jinja path (default: the tokenizer's)")
    s.add_argument("--max-new-tokens", type=int, default=256)
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--trust-remote-code", action="store_true")
    s.set_defaults(func=cmd_chat)

    s = sub.add_parser("data", help="inspect data")
    dsub = s.add_subparsers(dest="data_command", required=True)
    d = dsub.add_parser("preview", help="print one rendered sample with its trained tokens marked")
    d.add_argument("config", nargs="?")
    d.add_argument("overrides", nargs="*")
    d.add_argument("--index", type=int, default=0, help="which sample (default 0)")
    d.add_argument("--no-color", action="store_true")
    d.set_defaults(func=cmd_data_preview)
    return p


def _split_config_arg(a) -> None:
    """`posttrain sft lr=1e-4 ...` without a YAML: the first positional is an override, not a file."""
    if getattr(a, "config", None) and "=" in a.config and not a.config.endswith((".yaml", ".yml")):
        a.overrides = [a.config] + list(a.overrides)
        a.config = None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after options (`data preview cfg.yaml --index 2 template=llama3`).
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _split_config_arg(args)
    _setup_logging()
    try:
        args.func(args)
    except PosttrainError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
