"""GRPO: posttrain vs TRL's GRPOTrainer, same model, prompts, group size, lengths, reward and settings.

    .venv/bin/python bench/grpo.py            # several minutes on 2 CPU cores
    .venv/bin/python bench/grpo.py --quick    # ~2 minute smoke run

Two workloads on the "small" tiny Llama and the embedded reverse-digits task (WORKLOADS below):
"answers" starts from a brief SFT (not timed), so completions are short answers that stop on their
own (after --quick's 40 SFT steps they are all still wrong: speed, not learning, is measured);
"to-the-limit" starts from the untrained model, so every
completion runs to max_completion_length: the generation-heavy shape of long reasoning rollouts.

One step on either side = `--prompts` prompts x `--group` completions, one optimizer step over all
of them (TRL: per_device_train_batch_size = generation_batch_size = prompts x group, one
iteration; posttrain: rollout_batch_size = prompts, one mini-batch, ppo_epochs 1). Both keep a
reference model for the KL term (beta, k3 in the loss), normalize rewards per group, average the
loss over the tokens of the step (TRL loss_type "dapo" = posttrain token_mean), fp32, no gradient
checkpointing, AdamW, constant learning rate.

Each side runs in its own child process, one after the other, so peak RSS (ru_maxrss) is that
side's alone. Seconds per step are the training loop's wall time over its steps (loading, the
engine's setup and the final save excluded, shown as "setup s"), split into generation (prompts to
completion tokens and text), scoring (rewards, reference log-probs, advantages) and training
(forward, backward, optimizer). The ratio posttrain / TRL is the number to read, not the absolute.

posttrain also runs with its rollouts on vLLM (when `make vllm` set it up), on-policy and with
async_rollouts: 1; there "gen" is the wait for the samples, and peak RSS leaves out vLLM's own
processes. TRL's vLLM mode needs vLLM importable beside TRL, which vLLM's CPU build (its pins) does
not allow here: it runs only where both install together (a GPU machine).

TRL 1.16 ships no PPOTrainer (neither in trl nor in trl.experimental), so there is no PPO pair.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import peak_rss_mib, pick, run_side, train_timer, work_dir, write_result

for _k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_k, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "grpo.json"
# posttrain's rollouts on its engine, on vLLM (a worker in vLLM's own environment, `make vllm`), and on vLLM
# with async_rollouts: 1 (the next step's generation overlaps this step's training).
VLLM_SIDES = {"posttrain-vllm": ["rollout_backend=vllm"],
              "posttrain-vllm-async": ["rollout_backend=vllm", "async_rollouts=1"]}
SIDES = ("posttrain", *VLLM_SIDES, "trl")
NO_PPO = "TRL 1.16 has no PPOTrainer (removed from trl, not in trl.experimental): PPO is not compared"



def completion_text(completion) -> str:
    """TRL hands conversational completions as [{"role": "assistant", "content": ...}]."""
    if isinstance(completion, list):
        return completion[-1]["content"] if completion else ""
    return str(completion)


def exact_match_reward(prompts, completions, answer, **kwargs) -> list[float]:
    """TRL's side of the reward: what posttrain's built-in `exact_match` computes."""
    return [float(completion_text(c).strip() == str(a).strip()) for c, a in zip(completions, answer)]


# ---------------------------------------------------------------------------------------------------
# Children: one training run each. They write a JSON result and exit.
# ---------------------------------------------------------------------------------------------------

def child_posttrain(spec: dict, side: str = "posttrain") -> dict:
    t_setup = time.perf_counter()
    import posttrain.train.rl.trainer as rl_trainer
    from posttrain.config import load_config
    from posttrain.train.rl.recipe import run_rl
    from posttrain.train.run_log import RunRecorder

    marks: dict = {}
    orig_train, orig_write = rl_trainer.RLTrainer.train, RunRecorder.finish

    def train(self):
        marks["start"] = time.perf_counter()
        return orig_train(self)

    def finish(*a, **kw):  # the loop's end: the final model is written from here
        marks.setdefault("end", time.perf_counter())
        return orig_write(*a, **kw)

    rl_trainer.RLTrainer.train, RunRecorder.finish = train, finish
    per_step = spec["prompts"] * spec["group"]
    overrides = [
        f"model_name_or_path={spec['model']}", f"dataset={spec['train']}", f"output_dir={spec['out']}",
        "overwrite_output_dir=true", "reward_funcs=[exact_match]", f"rollout_batch_size={spec['prompts']}",
        f"num_generations={spec['group']}", f"per_device_train_batch_size={per_step}",
        "gradient_accumulation_steps=1", "ppo_epochs=1", f"max_completion_length={spec['max_completion_length']}",
        f"temperature={spec['temperature']}", f"kl_coef={spec['beta']}", f"learning_rate={spec['lr']}",
        "lr_scheduler_type=constant", "warmup_steps=0", "weight_decay=0", "max_grad_norm=1.0",
        f"max_steps={spec['steps']}", f"seed={spec['seed']}", "logging_steps=1", "save_steps=0",
        "disable_tqdm=true", "report_to=none", "plot_loss=false", "bf16=false", "fp16=false",
        "gradient_checkpointing=false", *VLLM_SIDES.get(side, []),
    ]
    if side in VLLM_SIDES:
        overrides.append(f"vllm_python={spec['vllm_python']}")
    result = run_rl(load_config("grpo", None, overrides))
    steps = [r for r in result.metrics if "generation_s" in r]
    train_s = marks["end"] - marks["start"]
    return {
        "steps": len(steps), "train_s": train_s, "setup_s": time.perf_counter() - t_setup - train_s,
        "generation_s": sum(r["generation_s"] for r in steps),
        "scoring_s": sum(r["reward_s"] + r["experience_s"] for r in steps),
        "training_s": sum(r["train_s"] for r in steps),
        "reward_curve": [r["reward_mean"] for r in steps],
        "completion_length": sum(r["response_length"] for r in steps) / len(steps),
    }


def child_trl(spec: dict) -> dict:
    t_setup = time.perf_counter()
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    class TimedGRPOTrainer(GRPOTrainer):
        """Splits each step: `_generate` (prompts to completion ids and text) inside
        `_generate_and_score_completions` (plus rewards, reference log-probs, advantages)."""

        generation_s = 0.0
        rollout_s = 0.0

        def _generate(self, prompts):
            t = time.perf_counter()
            try:
                return super()._generate(prompts)
            finally:
                self.generation_s += time.perf_counter() - t

        def _generate_and_score_completions(self, inputs):
            t = time.perf_counter()
            try:
                return super()._generate_and_score_completions(inputs)
            finally:
                self.rollout_s += time.perf_counter() - t

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    # The same load posttrain does (fp32, SDPA), rather than letting TRL pick.
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32, attn_implementation="sdpa")
    rows = [json.loads(line) for line in Path(spec["train"]).read_text().splitlines() if line.strip()]
    dataset = Dataset.from_list(rows)  # in memory: no Arrow cache to make a second run look faster
    per_step = spec["prompts"] * spec["group"]
    config = GRPOConfig(
        output_dir=spec["out"], max_steps=spec["steps"], per_device_train_batch_size=per_step,
        gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1, num_generations=spec["group"],
        max_completion_length=spec["max_completion_length"], temperature=spec["temperature"], top_p=1.0, top_k=0,
        beta=spec["beta"], loss_type="dapo", scale_rewards="group", learning_rate=spec["lr"],
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, seed=spec["seed"],
        optim="adamw_torch",  # posttrain uses torch.optim.AdamW (not fused)
        bf16=False, fp16=False, gradient_checkpointing=False,  # TRL defaults both on; posttrain runs fp32, no GC
        logging_steps=1, eval_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0,
    )
    timer = train_timer()
    trainer = TimedGRPOTrainer(model=model, reward_funcs=[exact_match_reward], args=config, train_dataset=dataset,
                               processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    trainer.save_model(spec["out"])
    logs = [r for r in trainer.state.log_history if "reward" in r]
    train_s = timer.end - timer.start
    return {
        "steps": trainer.state.global_step, "train_s": train_s, "setup_s": time.perf_counter() - t_setup - train_s,
        "generation_s": trainer.generation_s, "scoring_s": trainer.rollout_s - trainer.generation_s,
        "training_s": train_s - trainer.rollout_s,
        "reward_curve": [r["reward"] for r in logs],
        "completion_length": sum(r["completions/mean_length"] for r in logs) / max(len(logs), 1),
    }


def run_child(side: str, spec_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    if spec.get("threads"):
        import torch

        torch.set_num_threads(spec["threads"])
    result = child_trl(spec) if side == "trl" else child_posttrain(spec, side)
    result["peak_rss_mib"] = peak_rss_mib()
    Path(spec["result"]).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------------
# Parent: the model and prompts, the runs, held-out scoring, the report
# ---------------------------------------------------------------------------------------------------

def prepare(work: Path, args) -> tuple[str, Path, list[dict]]:
    """The small tiny Llama after `--sft-steps` of SFT (a child process), the prompt rows, held-out rows."""
    from posttrain.data.synthetic import split_task, write_jsonl
    from posttrain.model.tiny import write_tiny_model

    base = write_tiny_model(work / "base", size="small")
    train, held = split_task(args.prompts * args.steps, args.eval_prompts, seed=args.seed)
    rows = [{"prompt": [{"role": "user", "content": r["messages"][0]["content"]}], "answer": r["answer"]}
            for r in train]
    prompts = write_jsonl(rows, work / "prompts.jsonl")
    if args.sft_steps == 0:  # the untrained model: completions run to max_completion_length
        check_same_prompts(str(base), rows[:16])
        return str(base), prompts, held
    sft_rows, _ = split_task(args.sft_steps * 32, 0, seed=args.seed + 1)
    sft_data = write_jsonl([{"messages": r["messages"]} for r in sft_rows], work / "sft.jsonl")
    sft_dir = work / "sft"
    overrides = dict(model_name_or_path=base, dataset=sft_data, output_dir=sft_dir, overwrite_output_dir=True,
                     learning_rate=3e-3, lr_scheduler_type="cosine", warmup_ratio=0.05, per_device_train_batch_size=32,
                     max_steps=args.sft_steps, cutoff_len=64, logging_steps=10, save_steps=0, seed=0,
                     disable_tqdm=True, plot_loss=False, report_to="none")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads)) if args.threads else None
    subprocess.run([sys.executable, "-m", "posttrain", "sft", *[f"{k}={v}" for k, v in overrides.items()]],
                   check=True, capture_output=True, env=env)
    check_same_prompts(str(sft_dir), rows[:16])
    return str(sft_dir), prompts, held


def check_same_prompts(model_dir: str, rows: list[dict]) -> None:
    """Both sides must generate from the same tokens: posttrain's renderer against the tokenizer's own
    apply_chat_template, which TRL uses."""
    from posttrain.data.prompts import to_prompt
    from posttrain.model.loading import load_tokenizer
    from posttrain.train.rl.recipe import tokenize_prompts

    tokenizer = load_tokenizer(model_dir)
    for i, r in enumerate(rows):
        ((ours, _),) = tokenize_prompts([to_prompt(r, "auto", "bench", i)], tokenizer, None, 512)
        theirs = tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]
        if list(ours) != list(theirs):
            raise SystemExit(f"prompt tokens differ for {r['prompt']}: {ours} vs {theirs}")


# name -> (what it measures, SFT steps that make the starting model (0: the untrained model), max completion length)
WORKLOADS = {
    "answers": ("the model after a brief SFT: short answers (~6 tokens) that stop on their own",
                {False: 150, True: 40}, {False: 16, True: 16}),
    "to-the-limit": ("the untrained model: every completion runs to max_completion_length (generation-heavy, "
                     "as long reasoning rollouts are)", {False: 0, True: 0}, {False: 64, True: 32}),
}


def table(runs: dict, start_em: float) -> None:
    head = ["side", "steps", "s/step", "gen s/step", "score s/step", "train s/step", "setup s", "peak RSS MiB",
            "compl len", "reward first->last", "held-out EM", "load avg"]
    rows = []
    for side, r in runs.items():
        n, curve = r["steps"], r["reward_curve"]
        rows.append([side, str(n), f"{r['s_per_step']:.2f}", f"{r['generation_s'] / n:.2f}", f"{r['scoring_s'] / n:.2f}",
                     f"{r['training_s'] / n:.2f}", f"{r['setup_s']:.1f}", f"{r['peak_rss_mib']:.0f}",
                     f"{r['completion_length']:.1f}", f"{curve[0]:.2f}->{curve[-1]:.2f}",
                     f"{r['heldout_exact_match']:.1%}", "->".join(str(x) for x in r["load_avg_1m"])])
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    for row in [head, ["-" * w for w in widths], *rows]:
        print("  ".join(x.rjust(w) if i else x.ljust(w) for i, (x, w) in enumerate(zip(row, widths))))
    print(f"(held-out exact match before GRPO: {start_em:.1%}; gen = prompts to completions, score = rewards + "
          "reference log-probs + advantages, train = forward/backward/optimizer; compl len counts the stop token)")


def run_workload(name: str, work: Path, args, sides: list[str]) -> dict:
    from posttrain.quickstart import exact_match

    about, sft_steps, max_len = WORKLOADS[name]
    args.sft_steps, args.max_completion_length = sft_steps[args.quick], max_len[args.quick]
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model, prompts, held = prepare(work, args)
    start_em = exact_match(model, held, max_new_tokens=args.max_completion_length)
    print(f"\n== {name}: {about}")
    print(f"model: small tiny-Llama, {args.sft_steps} SFT steps on reverse-digits ({time.perf_counter() - t0:.0f} s); "
          f"GRPO: {args.steps} steps x {args.prompts} prompts x {args.group} completions, max_completion_length "
          f"{args.max_completion_length}, lr {args.lr}, beta {args.beta}, reward exact match, torch threads "
          f"{args.threads or 'default'}")
    spec = {"model": model, "train": str(prompts), "steps": args.steps, "prompts": args.prompts, "group": args.group,
            "max_completion_length": args.max_completion_length, "temperature": args.temperature, "lr": args.lr,
            "beta": args.beta, "seed": args.seed, "threads": args.threads, "vllm_python": args.vllm_python}
    runs: dict[str, dict] = {}
    for side in sides:
        out = str(work / f"out-{side}")
        r = run_side(__file__, side, spec, work)
        r["s_per_step"] = r["train_s"] / r["steps"]
        r["heldout_exact_match"] = exact_match(out, held, max_new_tokens=args.max_completion_length)
        runs[side] = r
        print(f"{r['s_per_step']:.2f} s/step (load avg {r['load_avg_1m'][0]} -> {r['load_avg_1m'][1]})", flush=True)
    print()
    table(runs, start_em)
    ratios = {}
    per = lambda r, key: r[key] / r["steps"]  # noqa: E731
    if "posttrain" in runs and "trl" in runs:
        a, b = runs["posttrain"], runs["trl"]
        ratios["speed per step (trl s/step / posttrain s/step)"] = b["s_per_step"] / a["s_per_step"]
        ratios["generation (trl / posttrain)"] = per(b, "generation_s") / per(a, "generation_s")
        ratios["training (trl / posttrain)"] = per(b, "training_s") / per(a, "training_s")
        ratios["peak RSS (posttrain / trl)"] = a["peak_rss_mib"] / b["peak_rss_mib"]
    for side in VLLM_SIDES:
        if side in runs:
            v = runs[side]
            if "trl" in runs:
                ratios[f"speed per step (trl / {side})"] = runs["trl"]["s_per_step"] / v["s_per_step"]
            if "posttrain" in runs:
                ratios[f"speed per step (engine / {side})"] = runs["posttrain"]["s_per_step"] / v["s_per_step"]
                engine = runs["posttrain"]
                ratios[f"generation (engine / {side})"] = per(engine, "generation_s") / per(v, "generation_s")
    for k, v in ratios.items():
        print(f"{name}: {k}: {v:.2f}x")
    return {"about": about, "settings": {k: spec[k] for k in ("steps", "prompts", "group", "max_completion_length",
                                                               "temperature", "lr", "beta", "seed", "threads")}
            | {"sft_steps": args.sft_steps}, "heldout_exact_match_start": start_em, "runs": runs, "ratios": ratios}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="~2 minute smoke run (fewer steps, a shorter SFT)")
    p.add_argument("--workloads", help=f"comma-separated, from {','.join(WORKLOADS)} (default: both)")
    p.add_argument("--steps", type=int, help="GRPO steps (default 16; quick 3)")
    p.add_argument("--prompts", type=int, default=8, help="prompts per step")
    p.add_argument("--group", type=int, default=8, help="completions per prompt (num_generations)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--beta", type=float, default=0.04, help="KL coefficient (both sides keep a reference model)")
    p.add_argument("--eval-prompts", type=int, default=64)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, help="torch threads per side (default: torch's own; on a shared, loaded "
                   "CPU 1 avoids OpenMP barrier stalls that swamp tiny-model timings)")
    p.add_argument("--sides", help=f"comma-separated, from {','.join(SIDES)} (default: both)")
    p.add_argument("--vllm-python", help="the Python of vLLM's environment (default: $POSTTRAIN_VLLM_PYTHON)")
    p.add_argument("--workdir", help="keep models, data and outputs here (default: a temp folder, removed)")
    p.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return run_child(args.child, Path(args.spec))

    args.steps = args.steps or (3 if args.quick else 16)
    if args.threads:  # the held-out scoring in this process too
        import torch

        torch.set_num_threads(args.threads)
    from posttrain.generation.vllm_backend import find_vllm_python

    args.vllm_python = find_vllm_python(args.vllm_python)
    default = [s for s in SIDES if s not in VLLM_SIDES or args.vllm_python]
    if not args.vllm_python:
        print("no vLLM (make vllm, then --vllm-python .venv-vllm/bin/python or $POSTTRAIN_VLLM_PYTHON): its sides "
              "are left out")
    sides = pick(p, args.sides, SIDES, ",".join(default), "side")
    workloads = pick(p, args.workloads, WORKLOADS, ",".join(WORKLOADS), "workload")
    print(NO_PPO)
    work = work_dir(args.workdir, "bench-grpo-")
    results = {w: run_workload(w, work / w, args, sides) for w in workloads}
    result = {"bench": "grpo", "quick": args.quick, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "ppo": NO_PPO,
              "workloads": results}
    write_result(RESULTS, result)


if __name__ == "__main__":
    main()
