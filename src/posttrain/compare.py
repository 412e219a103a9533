"""`posttrain compare`: full fine-tuning vs LoRA vs P-tuning on the embedded task, or on your own
model (`--base`), data (`--data`) and chat template (`--template`), measured here.

Each method trains in its own child process on the same base, data, batch size and number of
steps, so its wall time and peak memory (the child's max RSS) are its own. One table comes out:
parameters updated (count and %), wall time, peak memory, held-out exact match, output size.
Learning rates differ by method, as each needs (a soft prompt or a low-rank update moves less per
step than a full update); everything else is shared.

With `--data` (SFT rows in any format), a held-out share of the rows is set aside before training,
and a held-out row counts as right when the greedy answer to its messages before the last assistant
turn equals that turn's text.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from posttrain.errors import ConfigError, PosttrainError

# method -> settings layered over the shared budget
METHODS: dict[str, dict] = {
    "full": dict(finetuning_type="full", learning_rate=3e-3),
    # The final norm trains too: on a randomly initialised base, low-rank updates alone cannot raise the
    # logit scale that its frozen norm and small tied embeddings cap (128 extra weights here).
    "lora": dict(finetuning_type="lora", lora_rank=16, lora_target="all", modules_to_save="norm", learning_rate=5e-3),
    "ptuning": dict(finetuning_type="ptuning", num_virtual_tokens=16, encoder_hidden_size=128, learning_rate=1e-2),
    "prompt_tuning": dict(finetuning_type="prompt_tuning", num_virtual_tokens=16, learning_rate=3e-2),
    "prefix_tuning": dict(finetuning_type="prefix_tuning", num_virtual_tokens=16, learning_rate=1e-2),
    "freeze": dict(finetuning_type="freeze", freeze_trainable_layers=2, learning_rate=3e-3),
}
DEFAULT_METHODS = ("full", "lora", "ptuning")
CUTOFF_LEN = 64  # training rows (every task row fits)
DATA_CUTOFF_LEN = 1024  # training rows of --data (SFT's default cutoff_len)
ANSWER_TOKENS = 16  # generated per held-out prompt of the embedded task (quickstart.exact_match)


def run_child(spec_path: Path) -> None:
    """One method's training run plus its evaluation; writes a JSON result beside the spec."""
    from posttrain.config import SFTConfig, build_config
    from posttrain.model.adapters import model_bytes
    from posttrain.quickstart import exact_match
    from posttrain.train.sft import run_sft

    spec = json.loads(spec_path.read_text())
    start = time.perf_counter()
    result = run_sft(build_config(SFTConfig, spec["config"]))
    train_s = time.perf_counter() - start
    held_out = [json.loads(l) for l in Path(spec["held_out"]).read_text().splitlines() if l.strip()]
    summary = next(r for r in result.metrics if "trainable_params" in r)
    out = Path(spec["config"]["output_dir"])
    accuracy = exact_match(out, held_out, max_new_tokens=spec["answer_tokens"])
    Path(spec["result"]).write_text(json.dumps({
        **{k: summary[k] for k in ("trainable_params", "total_params", "trainable_percent")},
        "train_s": train_s, "final_loss": result.train_loss, "accuracy": accuracy,
        "output_bytes": model_bytes(out),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


def run_compare(output_dir: str = "runs/compare", methods: list[str] | None = None, steps: int = 400,
                base: str | None = None, batch_size: int = 32, quiet: bool = False, train_rows: int = 6000,
                held_out_rows: int = 200, data: str | None = None, template: str | None = None) -> dict[str, dict]:
    """`data`: SFT rows to train on instead of the embedded task (held-out rows split from them);
    `template`: the chat template every method trains and answers with (default: the base's own)."""
    from posttrain.data.synthetic import split_task, write_jsonl
    from posttrain.model.tiny import write_tiny_model

    methods = list(methods or DEFAULT_METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"compare: unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    root = Path(output_dir)
    if data is not None:
        rows, held_out = _user_rows(data, held_out_rows)
    else:
        rows, held_out = split_task(train_rows, held_out_rows, seed=0)
    base = base or str(write_tiny_model(root / "base-model"))
    context, answer_tokens = _check_context(base, held_out, methods, template, data is not None)
    cutoff = DATA_CUTOFF_LEN if data is not None else CUTOFF_LEN
    train = write_jsonl([{k: r[k] for k in ("messages", "tools") if r.get(k)} for r in rows],
                        root / "data" / "train.jsonl")
    held = write_jsonl(held_out, root / "data" / "held_out.jsonl")
    results: dict[str, dict] = {}
    for method in methods:
        config = dict(model_name_or_path=base, dataset=str(train), output_dir=str(root / method),
                      overwrite_output_dir=True, per_device_train_batch_size=batch_size, max_steps=steps,
                      cutoff_len=min(cutoff, context), lr_scheduler_type="cosine", warmup_ratio=0.05, logging_steps=25,
                      save_steps=0, disable_tqdm=True, seed=0, **METHODS[method])
        if template:
            config["template"] = template  # saved with each output, so its answers are rendered with it too
        spec = root / f".{method}-spec.json"
        spec.write_text(json.dumps({"config": config, "held_out": str(held), "result": str(root / f".{method}.json"),
                                    "answer_tokens": answer_tokens}))
        if not quiet:
            print(f"[compare] training {method} ({steps} steps, batch {batch_size}) ...", flush=True)
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "posttrain.compare", str(spec)], capture_output=True, text=True)
        last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
        if proc.returncode == 2 and last.startswith("error: "):  # the child's own clear error (see __main__)
            raise ConfigError(f"compare: the {method} run failed: {last[len('error: '):]}")
        if proc.returncode != 0:
            raise RuntimeError(f"compare: the {method} run failed:\n{proc.stderr[-3000:]}")
        results[method] = json.loads((root / f".{method}.json").read_text())
        results[method]["wall_s"] = time.perf_counter() - started
    table = format_table(results)
    (root / "compare.json").write_text(json.dumps(results, indent=2) + "\n")
    (root / "compare.md").write_text(table + "\n")
    if not quiet:
        print(table)
        print(f"[compare] table: {root / 'compare.md'}")
    return results


def _user_rows(data: str, held_out_rows: int) -> tuple[list[dict], list[dict]]:
    """`data`'s conversations as training rows and held-out rows (`messages`, `tools`, and the last assistant
    turn's text as the `answer`): a tenth of the rows, at most `held_out_rows`, chosen by seed 0."""
    from posttrain.data.formats import DatasetSpec, load_conversations
    from posttrain.data.prepare import split_eval
    from posttrain.errors import DataError

    convs, _ = load_conversations([DatasetSpec(path=data)])
    text = [c.source for c in convs if c.is_text]
    if text:
        raise DataError("--data: compare scores each held-out answer, so every row must be a conversation ending "
                        f"in an assistant turn; {len(text)} are plain text (first: {text[0]})", data)
    if len(convs) < 2:
        raise DataError(f"--data has {len(convs)} row; compare needs at least 2 (some to train on, one held out)",
                        data)
    train, held = split_eval(convs, min(held_out_rows, max(1, len(convs) // 10)), seed=0)

    def row(c) -> dict:
        return {"messages": [m.to_dict() for m in c.messages], "tools": c.tools,
                "answer": c.messages[-1].content.strip()}

    return [row(c) for c in train], [row(c) for c in held]


def _check_context(base: str, held_out: list[dict], methods: list[str], template: str | None = None,
                   measure_answers: bool = False) -> tuple[int, int]:
    """The base's context length and the tokens generated per held-out answer (the longest answer and its end
    when `measure_answers`, else ANSWER_TOKENS), checked to hold every held-out prompt, the virtual tokens of the
    prompt methods and an answer (before any method trains); the template checked against the tokenizer."""
    from posttrain.data.chat import ChatRenderer
    from posttrain.data.templates import check_template_encodes
    from posttrain.model.files import read_json
    from posttrain.model.loading import load_tokenizer, resolve_model_path
    from posttrain.quickstart import _asking, prompt_of

    folder = resolve_model_path(base, "--base")
    context = read_json(folder / "config.json", "config.json").get("max_position_embeddings") or CUTOFF_LEN
    tokenizer = load_tokenizer(str(folder))
    renderer = ChatRenderer(tokenizer, template)
    check_template_encodes(tokenizer, renderer.template, template)
    longest = max(len(renderer.prompt_ids(_asking(prompt_of(r)))) for r in held_out)
    answer_tokens = ANSWER_TOKENS
    if measure_answers:
        answer_tokens = max(len(tokenizer(r["answer"], add_special_tokens=False)["input_ids"]) for r in held_out) + 1
    virtual = max(METHODS[m].get("num_virtual_tokens", 0) for m in methods)
    if longest + virtual + answer_tokens > context:
        raise ConfigError(f"--base {base}: the model's context is {context} tokens, but the held-out prompts take up "
                          f"to {longest}" + (f" plus {virtual} virtual tokens" if virtual else "")
                          + f" plus {answer_tokens} for the answer; use a model with a longer context"
                          + (" or leave out the prompt methods (--methods full,lora)" if virtual else ""))
    return context, answer_tokens


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def format_table(results: dict[str, dict]) -> str:
    rows = [("method", "params updated", "% of model", "train s", "peak RSS", "held-out exact match", "output size")]
    for method, r in results.items():
        rows.append((method, f"{r['trainable_params']:,}", f"{r['trainable_percent']:.2f}%", f"{r['train_s']:.0f}",
                     _size(r["peak_rss_mib"] * 2**20), f"{r['accuracy']:.1%}", _size(r["output_bytes"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        run_child(Path(sys.argv[1]))
    except PosttrainError as err:  # reported by the parent as one line; anything else keeps its traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
