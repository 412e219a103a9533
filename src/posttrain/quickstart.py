"""`posttrain quickstart`: teach a tiny local model a task, end to end, with no downloads.

Builds the tiny default model, writes the embedded task data, measures held-out exact-match
accuracy, runs SFT through the same code path as `posttrain sft`, and measures again; a LoRA run
on the same budget stands beside it. The SFT data also asks the task in other words, demonstrated
by a source that mostly wraps its answers ("Answer: 321"), so the SFT model leaves those wordings
undone, and every later stage starts from it there: pairs of the exact answer against its own wrong
answers train a reward model and run DPO (`posttrain rm` / `posttrain dpo`), PPO maximizes the DPO
model's implicit reward (its critic starting from the reward model), GRPO exact match as a rule
(`posttrain ppo` / `posttrain grpo`), each keeping an eye on the original wording as the skill to retain."""

from __future__ import annotations

import time
from pathlib import Path

from posttrain.config import build_config, SFTConfig
from posttrain.data.chat import ChatRenderer
from posttrain.data.schema import Conversation, Message
from posttrain.data.synthetic import split_task, write_jsonl
from posttrain.data.templates import chat_stop_ids
from posttrain.generation.texts import generate
from posttrain.model.loading import load_for_inference
from posttrain.model.tiny import write_tiny_model
from posttrain.train.sft import run_sft


def greedy_answers(model_path: str | Path, prompts: list[str | Conversation], max_new_tokens: int = 16,
                   adapter: str | Path | None = None) -> list[str]:
    """The model's greedy answer to each prompt (a model folder, or an adapter's), rendered with the folder's
    own chat template: a one-turn user prompt, or a conversation (messages and tools) before its answer."""
    model, tokenizer = load_for_inference(str(model_path), str(adapter) if adapter else None)
    renderer = ChatRenderer(tokenizer)
    # prompt_ids renders everything before the last assistant turn: the answer itself is never read.
    ids = [renderer.prompt_ids(_asking(p)) for p in prompts]
    return [a.strip() for a in generate(model, tokenizer, ids, max_new_tokens=max_new_tokens,
                                        stop_ids=chat_stop_ids(tokenizer, renderer.template))]


def _asking(prompt: str | Conversation) -> Conversation:
    """The prompt as a conversation ending in an empty assistant turn (the one to generate)."""
    if isinstance(prompt, str):
        prompt = Conversation([Message(role="user", content=prompt)])
    return Conversation([*prompt.messages, Message(role="assistant", content="")], tools=prompt.tools)


def prompt_of(row: dict) -> str | Conversation:
    """What a held-out row asks: `{"prompt", "answer"}` (one user prompt), or `{"messages", "answer"}` (the
    messages before the answer, with the row's `tools`)."""
    if "prompt" in row:
        return row["prompt"]
    messages = [Message(**m) for m in row["messages"]]
    if messages[-1].role == "assistant":
        messages = messages[:-1]
    return Conversation(messages, tools=row.get("tools"))


def exact_match(model_path: str | Path, rows: list[dict], max_new_tokens: int = 16, adapter: str | Path | None = None) -> float:
    """Fraction of rows whose greedy answer equals `row["answer"]` exactly."""
    return accuracy(greedy_answers(model_path, [prompt_of(r) for r in rows], max_new_tokens, adapter), rows)


def accuracy(answers: list[str], rows: list[dict]) -> float:
    return sum(a == r["answer"] for a, r in zip(answers, rows)) / len(rows)


def sft_config(base: Path, data: Path, out: Path, fast: bool, seed: int = 0, **extra) -> SFTConfig:
    return build_config(SFTConfig, dict(dict(
        model_name_or_path=str(base), dataset=str(data), output_dir=str(out), overwrite_output_dir=True,
        learning_rate=3e-3, lr_scheduler_type="cosine", warmup_ratio=0.05, weight_decay=0.01,
        per_device_train_batch_size=32, num_train_epochs=SFT_EPOCHS[fast],
        cutoff_len=64, val_size=200, logging_steps=10, eval_steps=100, save_steps=0, seed=seed), **extra))


# The LoRA stage: rank 16 on every linear layer, plus the final norm trained in full. A randomly
# initialised base cannot raise its logit scale through low-rank updates alone (its frozen norm and
# small tied embeddings cap it), so the 128-weight norm rides along as a module to save. 2e-3: a higher
# rate sits at the edge of divergence on this model.
LORA_STAGE = dict(finetuning_type="lora", lora_rank=16, lora_target="all", modules_to_save="norm", learning_rate=2e-3)
# By `fast`: --fast trains every stage less (a smoke run whose figures still move the right way).
SFT_EPOCHS = {False: 8, True: 3}


def lora_stage(base: Path, data: Path, root: Path, held_out: list[dict], fast: bool, full: dict, seed: int = 0) -> dict:
    """LoRA with the same data and budget as the full run: accuracy, parameters and size side by side."""
    from posttrain.model.adapters import model_bytes

    result = run_sft(sft_config(base, data, root / "sft-lora", fast, seed, **LORA_STAGE))
    summary = next(r for r in result.metrics if "trainable_params" in r)
    accuracy = exact_match(result.output_dir, held_out)
    size = model_bytes(result.output_dir)
    print(f"[quickstart] LoRA adapter: {summary['trainable_params']:,} trained parameters "
          f"({summary['trainable_percent']:.1f}%), {size / 2**10:.0f} KiB, held-out exact match {accuracy:.1%} "
          f"(full SFT: {full['params']:,} parameters, {full['bytes'] / 2**10:.0f} KiB, {full['accuracy']:.1%})")
    print(f"[quickstart] adapter: {result.output_dir}  (PEFT format; `posttrain chat {result.output_dir}`, "
          f"`posttrain export adapter_name_or_path={result.output_dir} export_dir=...`)")
    return {"accuracy": accuracy, "output_dir": result.output_dir, "bytes": size, **summary}


def run_quickstart(output_dir: str = "runs/quickstart", fast: bool = False, seed: int = 0) -> dict:
    """Every stage in turn; `seed` picks the tiny model's initial weights, the data and every stage's seed.
    Every printed figure also goes to OUTPUT_DIR/summary.json (bench/efficacy.py reads it over seeds)."""
    start = time.perf_counter()
    root = Path(output_dir)
    base = write_tiny_model(root / "base-model", seed=seed)
    train_rows, held_out = split_task(ORIGINAL_ROWS, 200, seed=seed)
    demos, new_train, new_held = rephrased_rows(NEW_DEMOS, 2000, 200, seed=seed)
    data = write_jsonl(sft_rows(train_rows, demos, seed), root / "data" / "train.jsonl")
    write_jsonl(held_out, root / "data" / "held_out.jsonl")
    print(f"[quickstart] tiny Llama written to {base}; task: reverse a string of 3-7 digits "
          f"({len(train_rows)} train rows as 'reverse 123', {len(held_out)} held-out; and {len(demos)} "
          f"demonstrations in other words, {WRAPPED_SHARE:.0%} of them written 'Answer: 321')")
    before = exact_match(base, held_out)
    print(f"[quickstart] held-out exact match before SFT: {before:.1%}")
    result = run_sft(sft_config(base, data, root / "sft", fast, seed))
    after = exact_match(result.output_dir, held_out)
    print(f"[quickstart] held-out exact match before SFT: {before:.1%}  after SFT: {after:.1%}")
    print(f"[quickstart] model: {result.output_dir}")
    if result.plot:
        print(f"[quickstart] loss curve: {result.plot}")
    print(f"[quickstart] try it: posttrain chat {result.output_dir} --prompt 'reverse 12345'")
    from posttrain.model.adapters import model_bytes

    full = {"params": next(r for r in result.metrics if "trainable_params" in r)["trainable_params"],
            "bytes": model_bytes(result.output_dir), "accuracy": after}
    lora = lora_stage(base, data, root, held_out, fast, full, seed)
    # The SFT model's answers on the held-out other wordings: its accuracy there, and the held-out pairs.
    sft_answers = greedy_answers(result.output_dir, [r["prompt"] for r in new_held])
    headroom = accuracy(sft_answers, new_held)
    wrapped = sum(a == wrapped_answer(r) for a, r in zip(sft_answers, new_held)) / len(new_held)
    print(f"[quickstart] the SFT model asked in the other words ({', '.join(repr(p.format('123')) for p in NEW_PHRASINGS)}): "
          f"held-out exact match {headroom:.1%}, 'Answer: ...' {wrapped:.1%}: it learned the demonstrations' "
          f"habit; the preference and RL stages train on these wordings")
    preference = preference_stage(result.output_dir, new_train, new_held, sft_answers, held_out, root, fast, seed)
    rl = rl_stage(result.output_dir, preference, new_train, new_held, held_out, root, fast, seed)
    seconds = time.perf_counter() - start
    summary = write_summary(root, seed, fast, seconds, before, after, lora, headroom, preference, rl)
    print(f"[quickstart] finished in {seconds:.0f}s; every figure: {root / 'summary.json'}")
    return {"before": before, "after": after, "output_dir": result.output_dir, "plot": result.plot,
            "preference": preference, "lora": lora, "rl": rl, "summary": summary}


def write_summary(root: Path, seed: int, fast: bool, seconds: float, before: float, after: float, lora: dict,
                  headroom: float, preference: dict, rl: dict) -> dict:
    """summary.json: each stage's held-out figures (exact match unless named), written whole or not at all."""
    import json
    import os

    keep = lambda d, *keys: {k: round(d[k], 4) for k in keys}  # noqa: E731
    summary = {"seed": seed, "fast": fast, "seconds": round(seconds, 1),
               "sft": {"before": round(before, 4), "after": round(after, 4)},
               "lora": {"after": round(lora["accuracy"], 4)},
               "headroom": round(headroom, 4),  # the SFT model on the other wordings: where the later stages start
               # the reward model PPO uses (the DPO model's implicit reward), and the score-head one
               **{key: {("pair_accuracy" if kind == "all" else f"{kind}_pair_accuracy"): round(v, 4)
                        for kind, v in preference[key].items()} for key in ("rm", "rm_head")},
               "dpo": keep(preference, "before", "after", "original_after"),
               "ppo": keep(rl["ppo"], "before", "after", "original_after"),
               "grpo": keep(rl["grpo"], "before", "after", "original_after")}
    tmp = root / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    os.replace(tmp, root / "summary.json")
    return summary


# ---- the task SFT leaves undone: the reversal asked in other words --------------------------------

# SFT imitates its demonstrations, habits included. The reversal asked as "reverse 12345" is
# demonstrated cleanly; asked in other words it is demonstrated by a source that wraps two answers in
# three as "Answer: 54321", which the task's check (exact match) counts as wrong. The SFT model learns
# that mix: greedy, it mostly wraps (exact match near 10-20%), sampled, it answers bare about a third
# of the time. The preference and RL stages learn from judgements of whole answers instead (pairs, a
# reward model, a rule) and move it to the bare answer, which is room that holds on every seed, CPU and
# GPU: it does not depend on how a random-init model happens to generalize to words it never saw.
NEW_PHRASINGS = ("Reverse {}", "reverse: {}", "invert {}", "please reverse {}")
ORIGINAL_ROWS, NEW_DEMOS, WRAPPED_SHARE = 5000, 1500, 2 / 3


def wrapped_answer(row: dict) -> str:
    return f"Answer: {row['answer']}"


def rephrased_rows(n_demos: int, n_train: int, n_eval: int, seed: int) -> tuple[list[dict], list[dict], list[dict]]:
    """{prompt, answer} rows of the reverse task (3-7 digits) in NEW_PHRASINGS: the SFT demonstrations, the
    preference / RL prompts and the held-out ones; no prompt in two of them."""
    import random

    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n_demos + n_train + n_eval:
        word = "".join(rng.choice("0123456789") for _ in range(rng.randint(3, 7)))
        prompt = rng.choice(NEW_PHRASINGS).format(word)
        if prompt not in seen:
            seen.add(prompt)
            rows.append({"prompt": prompt, "answer": word[::-1]})
    return rows[:n_demos], rows[n_demos:n_demos + n_train], rows[n_demos + n_train:]


def sft_rows(original: list[dict], demos: list[dict], seed: int) -> list[dict]:
    """The SFT data: the original rows, and the other wordings' demonstrations, WRAPPED_SHARE of them wrapped."""
    import random

    rng = random.Random(seed)
    rows = [{"messages": r["messages"]} for r in original]
    rows += [{"messages": [{"role": "user", "content": r["prompt"]},
                           {"role": "assistant", "content": wrapped_answer(r) if rng.random() < WRAPPED_SHARE
                            else r["answer"]}]} for r in demos]
    rng.shuffle(rows)
    return rows


# ---- the preference stage: a reward model and DPO on the model's own mistakes --------------------

def on_policy_pairs(rows: list[dict], answers: list[str], seed: int) -> tuple[list[dict], list[dict]]:
    """{prompt, chosen, rejected} pairs of two kinds: the exact answer against the model's own greedy `answers`
    where that is wrong (as in on-policy / iterative DPO), and against a near miss of the same length (a digit
    changed, two swapped, the reversal undone) on every prompt, which only a judge of the digits tells apart."""
    import random

    from posttrain.data.synthetic import wrong_answer

    rng = random.Random(seed)
    own = [{"prompt": r["prompt"], "chosen": r["answer"], "rejected": a}
           for a, r in zip(answers, rows) if a and a != r["answer"]]
    near = [{"prompt": r["prompt"], "chosen": r["answer"], "rejected": wrong_answer(r["answer"], rng, True)}
            for r in rows]
    return own, near


def preference_accuracy(model_path: str | Path, pairs_path: Path) -> float:
    """Fraction of pairs whose chosen response the model finds likelier than the rejected one."""
    from posttrain.data.formats import DatasetSpec
    from posttrain.data.pairs import response_renderer, tokenize_pairs
    from posttrain.data.preference_formats import load_preferences
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


def preference_stage(sft_dir: Path, train: list[dict], held: list[dict], held_answers: list[str], original: list[dict],
                     root: Path, fast: bool, seed: int = 0) -> dict:
    """Pairs on the other wordings, the exact answer (chosen) against the SFT model's own wrong answer and
    against a same-length near miss: train a reward model on the SFT model, then run DPO from the SFT
    model; held-out pair accuracy (each kind apart too) and exact match before and after."""
    from posttrain.config import DPOConfig, RMConfig
    from posttrain.train.dpo import run_dpo
    from posttrain.train.rm import run_rm

    n = PREFERENCE_PROMPTS[fast]
    train_answers = greedy_answers(sft_dir, [r["prompt"] for r in train[:n]])
    own, near = on_policy_pairs(train[:n], train_answers, seed=seed)
    pairs = write_jsonl(own + near, root / "data" / "pairs.jsonl")
    held_own, held_near = on_policy_pairs(held, held_answers, seed=seed + 1)
    held_pairs = write_jsonl(held_own + held_near, root / "data" / "held_out_pairs.jsonl")  # own answers first
    write_jsonl(held_own, root / "data" / "held_out_pairs_own.jsonl")  # each kind apart, to score by hand
    write_jsonl(held_near, root / "data" / "held_out_pairs_same_length.jsonl")
    before = accuracy(held_answers, held)
    print(f"[quickstart] preference pairs on the other wordings: the exact answer against the SFT model's own answer "
          f"where wrong, and against a near miss of the same length; {len(own) + len(near)} train, "
          f"{len(held_own) + len(held_near)} held-out")
    common = dict(model_name_or_path=str(sft_dir), dataset=str(pairs), eval_dataset=str(held_pairs),
                  overwrite_output_dir=True, cutoff_len=64, per_device_train_batch_size=32, lr_scheduler_type="cosine",
                  warmup_ratio=0.1, logging_steps=10, save_steps=0, seed=seed)
    rm = run_rm(build_config(RMConfig, dict(common, output_dir=str(root / "rm"), **RM_STAGE)))
    head = pair_accuracies(rm.output_dir, held_pairs, len(held_own))
    print(f"[quickstart] reward model with a score head (`posttrain rm`): held-out pair accuracy {head['all']:.1%} "
          f"(exact answer scored above the wrong one): against the SFT model's own wrong answers {head['own']:.1%}, "
          f"against near misses of the same length {head['same_length']:.1%} (a head read at the last token learns "
          f"that digit check slowly); model: {rm.output_dir}")

    pref_before = preference_accuracy(sft_dir, held_pairs)
    dpo = run_dpo(build_config(DPOConfig, dict(common, output_dir=str(root / "dpo"),
                                               ref_cache_dir=str(root / "reference-cache"), **DPO_STAGE)))
    pref_after = preference_accuracy(dpo.output_dir, held_pairs)
    after, original_after = exact_match(dpo.output_dir, held), exact_match(dpo.output_dir, original)
    print(f"[quickstart] DPO from the SFT model: held-out exact match on the other wordings {before:.1%} -> {after:.1%} "
          f"(original wording after: {original_after:.1%}); preference accuracy {pref_before:.1%} -> {pref_after:.1%}")
    print(f"[quickstart] DPO model: {dpo.output_dir}")
    implicit = pair_accuracies(dpo.output_dir, held_pairs, len(held_own))
    print(f"[quickstart] the DPO model as a reward model (its implicit reward, beta * log pi/pi_ref, as `posttrain "
          f"score` and PPO's reward_model read a DPO folder): held-out pair accuracy {implicit['all']:.1%}: against "
          f"the SFT model's own wrong answers {implicit['own']:.1%}, against near misses of the same length "
          f"{implicit['same_length']:.1%}")
    return {"rm": implicit, "rm_head": head, "rm_dir": rm.output_dir, "before": before, "after": after,
            "original_after": original_after, "preference_before": pref_before, "preference_after": pref_after,
            "dpo_dir": dpo.output_dir}


def pair_accuracies(model_dir: Path, held_pairs: Path, own_rows: int) -> dict[str, float]:
    """`posttrain score`'s pair accuracy of a reward model on every held-out pair, and on each kind apart (the
    file's first `own_rows` lines are the pairs against the SFT model's own answers), from one scoring pass."""
    from posttrain.score import run_score

    scored = run_score(str(model_dir), str(held_pairs), batch_size=64)["scores"]
    right = {"all": [], "own": [], "same_length": []}
    for row in scored:
        kind = "own" if int(row["source"].rpartition(":")[2]) <= own_rows else "same_length"
        for key in ("all", kind):
            right[key].append(row["chosen"] > row["rejected"])
    return {kind: sum(r) / len(r) if r else float("nan") for kind, r in right.items()}


PREFERENCE_PROMPTS = {False: 2000, True: 512}  # by `fast`
RM_STAGE = dict(learning_rate=1e-3, num_train_epochs=3)
DPO_STAGE = dict(learning_rate=2e-4, pref_beta=0.1, pref_ftx=1.0, num_train_epochs=1)


# ---- the RL stage: PPO with the reward model, GRPO with a rule -------------------------------------

# Sampled at temperature 1, the SFT model answers bare about a third of the time, so a group of 8
# samples nearly always holds a right and a wrong answer: exact match itself is GRPO's reward, no
# partial credit needed. Both runs hold the policy near the SFT model with a KL term, and evaluate the
# original wording as the skill to retain: the retain_drop alarm stops a run that takes it below 95% of
# where it started.
GRPO_STAGE = dict(temperature=1.0, num_generations=8, rollout_batch_size=16, per_device_train_batch_size=128,
                  learning_rate=3e-4, kl_coef=0.1, max_completion_length=16, lr_scheduler_type="constant")
# PPO: one completion per prompt, the DPO model's implicit reward (exact match only measured, weight 0, and
# watched on the original wording by retain_drop), a critic initialised from the score-head reward model, the
# KL penalty in the reward (k1), GAE and whitened advantages: the defaults.
PPO_STAGE = dict(temperature=1.0, rollout_batch_size=64, per_device_train_batch_size=32, ppo_epochs=4,
                 learning_rate=2e-4, critic_learning_rate=1e-3, kl_coef=0.1, max_completion_length=16,
                 lr_scheduler_type="constant")
RL_STEPS = {"PPO": {False: 24, True: 12}, "GRPO": {False: 30, True: 15}}  # by `fast`


def rl_run(config_cls, sft_dir: Path, prompts: Path, held_path: Path, retain_path: Path, out: Path, steps: int,
           seed: int = 0, **settings):
    """One `posttrain ppo|grpo` run; from its evals (greedy): held-out exact match before and after, the
    retained skill's after, and the reward it maximizes before and after."""
    from posttrain.train.rl.recipe import run_rl

    result = run_rl(build_config(config_cls, dict(
        model_name_or_path=str(sft_dir), dataset=str(prompts), eval_dataset=str(held_path),
        retain_eval_dataset=str(retain_path), output_dir=str(out), overwrite_output_dir=True, max_steps=steps,
        eval_steps=max(1, steps // 4), logging_steps=1, disable_tqdm=True, seed=seed, **settings)))
    evals = [r for r in result.metrics if "eval_rewards/exact_match" in r]
    return result, {"before": evals[0]["eval_rewards/exact_match"], "after": evals[-1]["eval_rewards/exact_match"],
                    "original_after": evals[-1]["eval_retain_rewards/exact_match"],
                    "reward_before": evals[0]["eval_reward"], "reward_after": evals[-1]["eval_reward"],
                    "stopped_by_alarm": next((k.split("/", 1)[1] for r in result.metrics for k in r
                                              if k.startswith("stopped_by_alarm/")), None)}


def rl_stage(sft_dir: Path, preference: dict, train: list[dict], held: list[dict], original: list[dict], root: Path,
             fast: bool, seed: int = 0) -> dict:
    """PPO with the DPO model's implicit reward (its critic starting from the score-head reward model) and GRPO
    with exact match as its rule, each from the SFT model on the other wordings (`posttrain ppo|grpo` code
    paths); held-out exact match before and after, and on the original wording (retain_eval_dataset) after."""
    from posttrain.config import GRPOConfig, PPOConfig

    prompts = write_jsonl(train, root / "data" / "rl_prompts.jsonl")
    held_path = write_jsonl(held, root / "data" / "rl_held_out.jsonl")
    retain = write_jsonl(original, root / "data" / "rl_retain.jsonl")  # messages rows: the answer turn is dropped
    out = {}
    for name, cls, settings, reward in (
            ("PPO", PPOConfig, PPO_STAGE, dict(reward_model=str(preference["dpo_dir"]),
                                               critic_model=str(preference["rm_dir"]), reward_funcs=["exact_match"],
                                               reward_weights=[1.0, 0.0], retain_metric="exact_match")),
            ("GRPO", GRPOConfig, GRPO_STAGE, dict(reward_funcs=["exact_match"]))):
        what = "the DPO model's implicit reward" if name == "PPO" else "a rule (exact match)"
        steps = RL_STEPS[name][fast]
        print(f"[quickstart] RL: {name} from the SFT model with {what} as reward, {steps} steps x "
              f"{settings['rollout_batch_size']} prompts x {settings.get('num_generations', 1)} samples")
        t = time.perf_counter()
        result, figures = rl_run(cls, sft_dir, prompts, held_path, retain, root / name.lower(), steps, seed,
                                 **settings, **reward)
        stopped = f"; stopped early by the {figures['stopped_by_alarm']} alarm" if figures["stopped_by_alarm"] else ""
        print(f"[quickstart] {name} ({time.perf_counter() - t:.0f}s): held-out exact match on the other wordings "
              f"{figures['before']:.1%} -> {figures['after']:.1%}; on the original wording {figures['original_after']:.1%} "
              f"after; the reward it maximizes ({'implicit reward' if name == 'PPO' else 'exact match'}, held-out) "
              f"{figures['reward_before']:.3f} -> {figures['reward_after']:.3f}{stopped}; model: {result.output_dir}")
        out[name.lower()] = {**figures, "output_dir": result.output_dir}
    return out
