"""`posttrain quickstart`: teach a tiny local model a task, end to end, with no downloads.

Builds the tiny default model, writes the embedded task data, measures held-out exact-match
accuracy, runs SFT through the same code path as `posttrain sft`, and measures again. Then the
preference stage: pairs of the exact answer against a near miss train a reward model and run DPO
from the SFT model (`posttrain rm` / `posttrain dpo` code paths).
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


def sft_config(base: Path, data: Path, out: Path, fast: bool, **extra) -> SFTConfig:
    return build_config(SFTConfig, dict(dict(
        model_name_or_path=str(base), dataset=str(data), output_dir=str(out), overwrite_output_dir=True,
        learning_rate=3e-3, lr_scheduler_type="cosine", warmup_ratio=0.05, weight_decay=0.01,
        per_device_train_batch_size=32, num_train_epochs=1 if fast else 4, max_steps=20 if fast else -1,
        cutoff_len=64, val_size=200, logging_steps=10, eval_steps=100, save_steps=0, seed=0), **extra))


# The LoRA stage: rank 16 on every linear layer, plus the final norm trained in full. A randomly
# initialised base cannot raise its logit scale through low-rank updates alone (its frozen norm and
# small tied embeddings cap it), so the 128-weight norm rides along as a module to save.
LORA_STAGE = dict(finetuning_type="lora", lora_rank=16, lora_target="all", modules_to_save="norm", learning_rate=5e-3)


def lora_stage(base: Path, data: Path, root: Path, held_out: list[dict], fast: bool, full: dict) -> dict:
    """LoRA with the same data and budget as the full run: accuracy, parameters and size side by side."""
    from posttrain.model.adapters import model_bytes

    result = run_sft(sft_config(base, data, root / "sft-lora", fast, **LORA_STAGE))
    summary = next(r for r in result.metrics if "trainable_params" in r)
    accuracy = exact_match(result.output_dir, held_out)
    size = model_bytes(result.output_dir)
    print(f"[quickstart] LoRA adapter: {summary['trainable_params']:,} trained parameters "
          f"({summary['trainable_percent']:.1f}%), {size / 2**10:.0f} KiB, held-out exact match {accuracy:.1%} "
          f"(full SFT: {full['params']:,} parameters, {full['bytes'] / 2**10:.0f} KiB, {full['accuracy']:.1%})")
    print(f"[quickstart] adapter: {result.output_dir}  (PEFT format; `posttrain chat {result.output_dir}`, "
          f"`posttrain export adapter_name_or_path={result.output_dir} export_dir=...`)")
    return {"accuracy": accuracy, "output_dir": result.output_dir, "bytes": size, **summary}


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
    from posttrain.model.adapters import model_bytes

    full = {"params": next(r for r in result.metrics if "trainable_params" in r)["trainable_params"],
            "bytes": model_bytes(result.output_dir), "accuracy": after}
    lora = lora_stage(base, data, root, held_out, fast, full)
    preference = preference_stage(result.output_dir, train_rows, held_out, root, fast, after)
    rl = rl_stage(result.output_dir, held_out, root, fast)
    print(f"[quickstart] finished in {time.perf_counter() - start:.0f}s")
    return {"before": before, "after": after, "output_dir": result.output_dir, "plot": result.plot, "preference": preference, "lora": lora, "rl": rl}


# ---- the preference stage: a reward model and DPO on exact answers against near misses ---------

def preference_accuracy(model_path: str | Path, pairs_path: Path) -> float:
    """Fraction of pairs whose chosen response the model finds likelier than the rejected one."""
    from posttrain.data.formats import DatasetSpec
    from posttrain.data.pairs import response_renderer, tokenize_pairs
    from posttrain.data.preference import load_preferences
    from posttrain.model.loading import load_model, load_tokenizer, pick_device
    from posttrain.train.logps import compute_logps

    tokenizer = load_tokenizer(str(model_path))
    device = pick_device("auto")
    model = load_model(str(model_path), device=device)
    samples = tokenize_pairs(load_preferences([DatasetSpec(path=str(pairs_path))])[0], response_renderer(tokenizer, None),
                             cutoff_len=64)[0]
    logps = compute_logps(model, [s.chosen for s in samples] + [s.rejected for s in samples],
                          pad_id=tokenizer.pad_token_id, device=device, batch_size=64)
    chosen, rejected = logps[:len(samples)], logps[len(samples):]
    return (chosen > rejected).float().mean().item()


def preference_stage(sft_dir: Path, train_rows: list[dict], held_out: list[dict], root: Path, fast: bool,
                     sft_accuracy: float) -> dict:
    """Pairs of the exact answer (chosen) against a near miss (rejected): train a reward model on the
    SFT model, then run DPO from the SFT model; held-out pair and task accuracy before and after."""
    from posttrain.config import DPOConfig, RMConfig
    from posttrain.data.synthetic import preference_pairs
    from posttrain.train.preference import run_dpo
    from posttrain.train.rm import run_rm

    pairs = write_jsonl(preference_pairs(train_rows[:PREFERENCE_PAIRS[fast]], seed=0), root / "data" / "pairs.jsonl")
    held = write_jsonl(preference_pairs(held_out, seed=1), root / "data" / "held_out_pairs.jsonl")
    print(f"[quickstart] preference pairs: the exact answer against a near miss (a digit changed, swapped, dropped "
          f"or added); {PREFERENCE_PAIRS[fast]} train, {len(held_out)} held-out")
    common = dict(model_name_or_path=str(sft_dir), dataset=str(pairs), eval_dataset=str(held), overwrite_output_dir=True,
                  cutoff_len=64, per_device_train_batch_size=32, num_train_epochs=1, lr_scheduler_type="cosine",
                  warmup_ratio=0.1, logging_steps=10, save_steps=0, seed=0)
    rm = run_rm(build_config(RMConfig, dict(common, output_dir=str(root / "rm"), **RM_STAGE)))
    rm_accuracy = [r for r in rm.metrics if "eval_accuracy" in r][-1]["eval_accuracy"]
    print(f"[quickstart] reward model: held-out pair accuracy {rm_accuracy:.1%} (exact answer scored above the "
          f"near miss); model: {rm.output_dir}")

    before = preference_accuracy(sft_dir, held)
    dpo = run_dpo(build_config(DPOConfig, dict(common, output_dir=str(root / "dpo"),
                                               ref_cache_dir=str(root / "reference-cache"), **DPO_STAGE)))
    after = preference_accuracy(dpo.output_dir, held)
    task_after = exact_match(dpo.output_dir, held_out)
    final = [r for r in dpo.metrics if "eval_rewards/accuracy" in r][-1]
    print(f"[quickstart] DPO from the SFT model: held-out preference accuracy {before:.1%} -> {after:.1%} (exact "
          f"answer likelier than the near miss); implicit-reward accuracy {final['eval_rewards/accuracy']:.1%}, "
          f"margin {final['eval_rewards/margin']:.2f}; held-out exact match {sft_accuracy:.1%} -> {task_after:.1%}")
    print(f"[quickstart] DPO model: {dpo.output_dir}")
    return {"rm_accuracy": rm_accuracy, "rm_dir": rm.output_dir, "preference_before": before,
            "preference_after": after, "reward_accuracy": final["eval_rewards/accuracy"],
            "task_after": task_after, "dpo_dir": dpo.output_dir}


PREFERENCE_PAIRS = {False: 2000, True: 256}  # by `fast`
RM_STAGE = dict(learning_rate=1e-3, num_train_epochs=2)
DPO_STAGE = dict(learning_rate=1e-4, pref_beta=0.1, pref_ftx=1.0)


# ---- the RL stage: GRPO with an exact-match rule reward where SFT leaves headroom ----------------

# The SFT data only ever says "reverse 12345". Asked in other words, the SFT model is right about a third
# of the time (and 0% on 8+ digits, where no reward has anything to follow). GRPO on these phrasings
# with the built-in exact-match reward teaches the task under words SFT never showed.
RL_PHRASINGS = ("Reverse {}", "reverse: {}", "invert {}", "please reverse {}")
# The SFT model is confident even when wrong: at temperature 1 most groups of samples agree, and a
# group that agrees has no advantage to learn from. Temperature 1.3 and groups of 16 give every step
# groups with both right and wrong answers. The KL term (k3 in the loss) holds the policy near the SFT
# model: without it the new phrasings gained more in our runs but the original one fell from 98% to 75%.
RL_STAGE = dict(temperature=1.3, num_generations=16, rollout_batch_size=8, per_device_train_batch_size=128,
                learning_rate=6e-4, kl_coef=0.3, max_completion_length=12, lr_scheduler_type="constant")
RL_STEPS = {False: 40, True: 12}  # by `fast`


def rephrased_rows(n_train: int, n_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
    """{prompt, answer} rows of the reverse task (3-7 digits) in RL_PHRASINGS; no prompt in both splits."""
    import random

    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n_train + n_eval:
        word = "".join(rng.choice("0123456789") for _ in range(rng.randint(3, 7)))
        prompt = rng.choice(RL_PHRASINGS).format(word)
        if prompt not in seen:
            seen.add(prompt)
            rows.append({"prompt": prompt, "answer": word[::-1]})
    return rows[:n_train], rows[n_train:]


def rl_stage(sft_dir: Path, held_out: list[dict], root: Path, fast: bool) -> dict:
    """GRPO from the SFT model on rephrased prompts (`posttrain grpo` code path): held-out exact match on
    the new phrasings before and after, and on the original phrasing after (it should not drop)."""
    from posttrain.config import GRPOConfig
    from posttrain.train.rl.stage import run_rl

    train, held = rephrased_rows(2000, 200, seed=0)
    prompts = write_jsonl(train, root / "data" / "rl_prompts.jsonl")
    held_path = write_jsonl(held, root / "data" / "rl_held_out.jsonl")
    steps = RL_STEPS[fast]
    print(f"[quickstart] RL: GRPO from the SFT model, exact-match reward, on the task asked in words SFT never saw "
          f"({', '.join(repr(p.format('123')) for p in RL_PHRASINGS)}); {steps} steps x {RL_STAGE['rollout_batch_size']} "
          f"prompts x {RL_STAGE['num_generations']} samples")
    t = time.perf_counter()
    result = run_rl(build_config(GRPOConfig, dict(
        model_name_or_path=str(sft_dir), dataset=str(prompts), eval_dataset=str(held_path), output_dir=str(root / "grpo"),
        overwrite_output_dir=True, reward_funcs=["exact_match"], max_steps=steps, eval_steps=steps, logging_steps=1,
        disable_tqdm=True, seed=0, **RL_STAGE)))
    evals = [r["eval_reward"] for r in result.metrics if "eval_reward" in r]
    original = exact_match(result.output_dir, held_out)
    print(f"[quickstart] GRPO ({time.perf_counter() - t:.0f}s): held-out exact match on the new phrasings "
          f"{evals[0]:.1%} -> {evals[-1]:.1%}; on the original phrasing {original:.1%} after")
    print(f"[quickstart] GRPO model: {result.output_dir}")
    return {"before": evals[0], "after": evals[-1], "original_after": original, "output_dir": result.output_dir}
