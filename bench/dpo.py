"""DPO and reward-model training: posttrain vs TRL's DPOTrainer / RewardTrainer, same model, pairs and settings.

    .venv/bin/python bench/dpo.py            # several minutes on 2 CPU cores
    .venv/bin/python bench/dpo.py --quick    # ~2 minute smoke run

Each side trains in its own child process, one after the other, so peak RSS (ru_maxrss) is that
side's alone; the ratios (posttrain / TRL) are the numbers to read, not the absolute speeds.

Throughput is training pairs per second of the training loop's wall time. Work done before the loop
is shown as "setup s": loading, tokenization, and the reference pass (posttrain always computes
reference log-probs once before training; TRL does so only with precompute_ref_log_probs=True —
by default it keeps a reference model and runs it on every batch). Both trained models are then
scored the same way, by posttrain's code, on held-out pairs: the DPO loss against the starting model
as reference (beta as in training) and the preference accuracy; for reward models the
Bradley-Terry loss and pair accuracy. Same loss there = same training, so the speed ratio is fair.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

from common import peak_rss_mib, pick, run_side, train_timer, work_dir, write_result

for _k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_k, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "dpo.json"

# side -> (stage, implementation, extra settings)
SIDES = {
    "posttrain-dpo": ("dpo", "posttrain", {}),
    "trl-dpo": ("dpo", "trl", {}),
    "trl-dpo-precompute": ("dpo", "trl", {"precompute_ref_log_probs": True}),
    "posttrain-rm": ("rm", "posttrain", {}),
    "trl-rm": ("rm", "trl", {}),
}
PAIRS = [("posttrain-dpo", "trl-dpo"), ("posttrain-dpo", "trl-dpo-precompute"), ("posttrain-rm", "trl-rm")]



# ---------------------------------------------------------------------------------------------------
# Children
# ---------------------------------------------------------------------------------------------------

def child_posttrain(stage: str, spec: dict, extra: dict) -> dict:
    t_setup = time.perf_counter()
    from posttrain.config import load_config
    from posttrain.train.loop import Trainer
    from posttrain.train.run_log import RunRecorder

    marks: dict = {}
    orig_train, orig_write = Trainer.train, RunRecorder.finish

    def train(self):
        marks["start"] = time.perf_counter()
        return orig_train(self)

    def finish(self, *a, **kw):  # the loop's end: the final model is written from here
        marks.setdefault("end", time.perf_counter())
        return orig_write(self, *a, **kw)

    Trainer.train, RunRecorder.finish = train, finish
    overrides = [
        f"model_name_or_path={spec['model']}", f"dataset={spec['train']}", f"output_dir={spec['out']}",
        f"per_device_train_batch_size={spec['batch']}", "gradient_accumulation_steps=1",
        f"cutoff_len={spec['max_length']}", f"learning_rate={spec['lr']}", "weight_decay=0",
        "lr_scheduler_type=constant", "warmup_steps=0", "max_grad_norm=1.0", f"seed={spec['seed']}",
        f"logging_steps={spec['logging_steps']}", "save_steps=0", "disable_tqdm=true", "report_to=none",
        "plot_loss=false", f"max_steps={spec['steps']}", "overwrite_output_dir=true",
    ]
    if stage == "dpo":
        from posttrain.train.dpo import run_dpo

        overrides += [f"pref_beta={spec['beta']}", f"ref_cache_dir={spec['out']}-cache"]
        result = run_dpo(load_config("dpo", None, overrides))
    else:
        from posttrain.train.rm import run_rm

        result = run_rm(load_config("rm", None, overrides))
    logs = [r for r in result.metrics if "loss" in r]
    train_s = marks["end"] - marks["start"]
    return {"steps": result.global_step, "pairs": result.global_step * spec["batch"], "train_s": train_s,
            "setup_s": time.perf_counter() - t_setup - train_s, "final_loss": result.train_loss,
            "loss_curve": [[r["step"], r["loss"]] for r in logs]}


def child_trl(stage: str, spec: dict, extra: dict) -> dict:
    t_setup = time.perf_counter()
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    rows = [json.loads(line) for line in Path(spec["train"]).read_text().splitlines() if line.strip()]
    dataset = Dataset.from_list(rows)
    common = dict(
        output_dir=spec["out"], max_steps=spec["steps"], per_device_train_batch_size=spec["batch"],
        gradient_accumulation_steps=1, learning_rate=spec["lr"], weight_decay=0.0, lr_scheduler_type="constant",
        warmup_steps=0, max_grad_norm=1.0, seed=spec["seed"], optim="adamw_torch", bf16=False, fp16=False,
        gradient_checkpointing=False,  # TRL defaults it on; posttrain runs without
        max_length=spec["max_length"], logging_steps=spec["logging_steps"], eval_strategy="no", save_strategy="no",
        report_to="none", disable_tqdm=True, dataloader_num_workers=0,
    )
    timer = train_timer()
    if stage == "dpo":
        from trl import DPOConfig, DPOTrainer

        model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32, attn_implementation="sdpa")
        config = DPOConfig(beta=spec["beta"], loss_type=["sigmoid"], **common, **extra)
        trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                             callbacks=[timer])
    else:
        from trl import RewardConfig, RewardTrainer

        model = AutoModelForSequenceClassification.from_pretrained(spec["model"], num_labels=1, dtype=torch.float32,
                                                                   attn_implementation="sdpa")
        model.config.pad_token_id = tokenizer.pad_token_id
        config = RewardConfig(**common, **extra)
        trainer = RewardTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                                callbacks=[timer])
    trainer.train()
    trainer.save_model(spec["out"])
    logs = [r for r in trainer.state.log_history if "loss" in r]
    train_s = timer.end - timer.start
    return {"steps": trainer.state.global_step, "pairs": trainer.state.global_step * spec["batch"],
            "train_s": train_s, "setup_s": time.perf_counter() - t_setup - train_s,
            "final_loss": logs[-1]["loss"] if logs else None, "loss_curve": [[r["step"], r["loss"]] for r in logs]}


def run_child(side: str, spec_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    stage, kind, extra = SIDES[side]
    if spec.get("threads"):
        import torch

        torch.set_num_threads(spec["threads"])
    result = (child_posttrain if kind == "posttrain" else child_trl)(stage, spec, extra)
    result["peak_rss_mib"] = peak_rss_mib()
    import torch

    if torch.cuda.is_available():
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    Path(spec["result"]).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------------
# Parent: data, the runs, held-out scoring, the report
# ---------------------------------------------------------------------------------------------------

def make_pairs(n: int, seed: int) -> list[dict]:
    """Conversational pairs of mixed length (tens to hundreds of tokens): the prompt is a chat up to its
    last user turn, chosen its own answer, rejected another chat's answer."""
    from posttrain.data.synthetic import chat_corpus

    rows = chat_corpus(n + 1, seed=seed, min_words=10, max_words=400)
    rng = random.Random(seed)
    pairs = []
    for i, row in enumerate(rows[:n]):
        messages = row["messages"]
        other = rows[(i + 1 + rng.randrange(n)) % (n + 1)]["messages"][-1]
        if other["content"] == messages[-1]["content"]:
            continue
        pairs.append({"prompt": messages[:-1], "chosen": [messages[-1]], "rejected": [other]})
    return pairs


def heldout_scores(stage: str, model_dir: str, base_dir: str, path: str, max_length: int, beta: float) -> dict:
    """The same yardstick for both sides: posttrain's tokenization and log-prob / reward code."""
    import torch
    import torch.nn.functional as F

    from posttrain.data.formats import DatasetSpec
    from posttrain.data.pairs import response_renderer, tokenize_pairs
    from posttrain.data.preference_formats import load_preferences
    from posttrain.model.loading import load_model, load_tokenizer

    tokenizer = load_tokenizer(base_dir)
    samples = tokenize_pairs(load_preferences([DatasetSpec(path=path)])[0], response_renderer(tokenizer, None),
                             max_length)[0]
    seqs = [s.chosen for s in samples] + [s.rejected for s in samples]
    n, cpu = len(samples), torch.device("cpu")
    if stage == "dpo":
        from posttrain.train.logps import compute_logps

        policy = compute_logps(load_model(model_dir, device=cpu), seqs, pad_id=tokenizer.pad_token_id, device=cpu,
                               batch_size=16)
        ref = compute_logps(load_model(base_dir, device=cpu), seqs, pad_id=tokenizer.pad_token_id, device=cpu,
                            batch_size=16)
        h = (policy[:n] - ref[:n]) - (policy[n:] - ref[n:])
        return {"heldout_loss": (-F.logsigmoid(beta * h)).mean().item(), "heldout_accuracy": (h > 0).float().mean().item()}
    from posttrain.model.reward import load_reward_model
    from posttrain.train.rm import score_sequences

    rewards = score_sequences(load_reward_model(model_dir, device=cpu), seqs, pad_id=tokenizer.pad_token_id, device=cpu,
                              batch_size=16)
    diff = rewards[:n] - rewards[n:]
    return {"heldout_loss": (-F.logsigmoid(diff)).mean().item(), "heldout_accuracy": (diff > 0).float().mean().item()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="~2 minute smoke run (fewer pairs and steps, shorter cutoff)")
    p.add_argument("--pairs", type=int, help="training pairs (default 256; quick 48)")
    p.add_argument("--eval-pairs", type=int, help="held-out pairs (default 64; quick 16)")
    p.add_argument("--steps", type=int, help="optimizer steps (default: one pass over the pairs)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-length", type=int, help="default 512; quick 256")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--logging-steps", type=int, default=4)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, help="torch threads per side (default: torch's own; on a shared, loaded "
                   "CPU 1 avoids OpenMP barrier stalls that swamp tiny-model timings)")
    p.add_argument("--sides", help=f"comma-separated, from {','.join(SIDES)} (default: all)")
    p.add_argument("--workdir", help="keep model, data and outputs here (default: a temp folder, removed)")
    p.add_argument("--child", choices=list(SIDES), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return run_child(args.child, Path(args.spec))

    args.pairs = args.pairs or (48 if args.quick else 256)
    args.eval_pairs = args.eval_pairs or (16 if args.quick else 64)
    args.max_length = args.max_length or (256 if args.quick else 512)
    args.steps = args.steps or -(-args.pairs // args.batch)
    sides = pick(p, args.sides, SIDES, ",".join(SIDES), "side")
    work = work_dir(args.workdir, "bench-dpo-")
    from posttrain.data.synthetic import write_jsonl
    from posttrain.model.tiny import write_tiny_model

    model = str(write_tiny_model(work / "model", size="small"))
    pairs = make_pairs(args.pairs + args.eval_pairs, seed=args.seed)
    train, heldout = write_jsonl(pairs[:args.pairs], work / "train.jsonl"), write_jsonl(pairs[args.pairs:], work / "heldout.jsonl")
    print(f"data: {args.pairs} training pairs, {len(pairs) - args.pairs} held-out, small tiny-Llama, "
          f"max_length {args.max_length}, batch {args.batch}, {args.steps} steps")
    spec = {"model": model, "train": str(train), "steps": args.steps, "batch": args.batch, "max_length": args.max_length,
            "lr": args.lr, "beta": args.beta, "seed": args.seed, "logging_steps": args.logging_steps,
            "threads": args.threads}

    runs: dict[str, dict] = {}
    for side in sides:
        out = str(work / f"out-{side}")
        r = run_side(__file__, side, spec, work)
        r["pairs_per_s"] = r["pairs"] / r["train_s"]
        r.update(heldout_scores(SIDES[side][0], out, model, str(heldout), args.max_length, args.beta))
        runs[side] = r
        print(f"{r['train_s']:.1f} s training, {r['pairs_per_s']:.2f} pairs/s, held-out loss {r['heldout_loss']:.4f} "
              f"(load avg {r['load_avg_1m'][0]} -> {r['load_avg_1m'][1]})", flush=True)

    head = ["side", "steps", "train s", "setup s", "pairs/s", "peak RSS MiB", "final train loss", "held-out loss",
            "held-out acc"]
    rows = [[side, str(r["steps"]), f"{r['train_s']:.1f}", f"{r['setup_s']:.1f}", f"{r['pairs_per_s']:.2f}",
             f"{r['peak_rss_mib']:.0f}", "-" if r["final_loss"] is None else f"{r['final_loss']:.4f}",
             f"{r['heldout_loss']:.4f}", f"{r['heldout_accuracy']:.3f}"] for side, r in runs.items()]
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    print()
    for row in [head, ["-" * w for w in widths], *rows]:
        print("  ".join(x.rjust(w) if i else x.ljust(w) for i, (x, w) in enumerate(zip(row, widths))))
    ratios = {}
    for a, b in PAIRS:
        if a in runs and b in runs:
            ratios[f"{a}/{b} throughput"] = runs[a]["pairs_per_s"] / runs[b]["pairs_per_s"]
            ratios[f"{a}/{b} peak RSS"] = runs[a]["peak_rss_mib"] / runs[b]["peak_rss_mib"]
            ratios[f"{a}-{b} held-out loss"] = runs[a]["heldout_loss"] - runs[b]["heldout_loss"]
    for k, v in ratios.items():
        print(f"{k}: {v:+.4f}" if k.endswith("loss") else f"{k}: {v:.2f}x")
    result = {"bench": "dpo", "quick": args.quick, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "settings": {k: spec[k] for k in ("steps", "batch", "max_length", "lr", "beta", "seed", "threads")},
              "throughput": "training pairs / training-loop wall time", "runs": runs, "ratios": ratios}
    write_result(RESULTS, result)


if __name__ == "__main__":
    main()
