"""`posttrain quickstart`: teach a tiny local model a task, end to end, with no downloads.

Builds the tiny default model, writes the embedded task data, measures held-out exact-match
accuracy, runs SFT through the same code path as `posttrain sft`, and measures again.
"""

from __future__ import annotations

import time
from pathlib import Path

from posttrain.config import build_config, SFTConfig
from posttrain.data.chat import ChatRenderer
from posttrain.data.schema import Conversation, Message
from posttrain.data.synthetic import split_task, write_jsonl
from posttrain.inference.generate import generate
from posttrain.model.loading import load_for_inference
from posttrain.model.tiny import write_tiny_model
from posttrain.train.sft import run_sft


def exact_match(model_path: str | Path, rows: list[dict], max_new_tokens: int = 16, adapter: str | Path | None = None) -> float:
    """Fraction of rows whose greedy answer equals `row["answer"]` exactly (a model folder, or an adapter's)."""
    model, tokenizer = load_for_inference(str(model_path), str(adapter) if adapter else None)
    renderer = ChatRenderer(tokenizer)
    prompts = [renderer.prompt_ids(Conversation([Message(**m) for m in r["messages"]])) for r in rows]
    answers = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
    return sum(a.strip() == r["answer"] for a, r in zip(answers, rows)) / len(rows)


def sft_config(base: Path, data: Path, out: Path, fast: bool) -> SFTConfig:
    return build_config(SFTConfig, dict(
        model_name_or_path=str(base), dataset=str(data), output_dir=str(out), overwrite_output_dir=True,
        learning_rate=3e-3, lr_scheduler_type="cosine", warmup_ratio=0.05, weight_decay=0.01,
        per_device_train_batch_size=32, num_train_epochs=1 if fast else 4, max_steps=20 if fast else -1,
        cutoff_len=64, val_size=200, logging_steps=10, eval_steps=100, save_steps=0, seed=0))


def run_quickstart(output_dir: str = "runs/quickstart", fast: bool = False) -> dict:
    start = time.perf_counter()
    root = Path(output_dir)
    base = write_tiny_model(root / "base-model")
    train_rows, held_out = split_task(6000, 200, seed=0)
    data = write_jsonl([{"messages": r["messages"]} for r in train_rows], root / "data" / "train.jsonl")
    write_jsonl(held_out, root / "data" / "held_out.jsonl")
    print(f"[quickstart] tiny Llama written to {base}; task: reverse a string of 3-7 digits "
          f"({len(train_rows)} train rows, {len(held_out)} held-out)")
    before = exact_match(base, held_out)
    print(f"[quickstart] held-out exact match before SFT: {before:.1%}")
    result = run_sft(sft_config(base, data, root / "sft", fast))
    after = exact_match(result.output_dir, held_out)
    print(f"[quickstart] held-out exact match before SFT: {before:.1%}  after SFT: {after:.1%}")
    print(f"[quickstart] model: {result.output_dir}")
    if result.plot:
        print(f"[quickstart] loss curve: {result.plot}")
    print(f"[quickstart] try it: posttrain chat {result.output_dir} --prompt 'reverse 12345'")
    print(f"[quickstart] finished in {time.perf_counter() - start:.0f}s")
    return {"before": before, "after": after, "output_dir": result.output_dir, "plot": result.plot}
