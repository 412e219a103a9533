"""SFT throughput, memory and loss: posttrain vs TRL's SFTTrainer, same model, data and settings.

    .venv/bin/python bench/sft.py            # a few minutes on 2 CPU cores
    .venv/bin/python bench/sft.py --quick    # ~1 minute smoke run
    .venv/bin/python bench/sft.py --lora     # LoRA: posttrain vs TRL SFTTrainer + PEFT LoraConfig

Each side trains in its own child process, one after the other, so peak RSS (ru_maxrss) is that
side's alone and both see the same machine load as closely as a shared machine allows; the ratio
(posttrain / TRL) is the number to read, not the absolute speed.

Throughput counts *trained* tokens (assistant tokens that receive loss) over the training loop's
wall time only: model writing, loading, tokenization and the final save are excluded (they are
shown separately as "setup s"). Both trained models are then reloaded with plain transformers and
scored the same way on held-out conversations, tokenized and masked by posttrain's renderer.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from common import peak_rss_mib, pick, run_side, train_timer, work_dir, write_result

# Nothing in this benchmark may reach a hub; set before transformers / datasets are imported.
for _k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_k, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "sft.json"

# ChatML with `{% generation %}` tags, for TRL's assistant_only_loss. It renders the same text as
# posttrain's templates/chatml.jinja (checked on every conversation before training) and tags the
# same span posttrain trains: the assistant content plus its <|im_end|>, not the newline after it.
TAGGED_CHATML = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# name -> (kind, extra settings). The headline ratio is posttrain (its defaults) over TRL (its
# defaults). The two opt-in sides swap the batch sampling (random vs length-grouped) so each
# implementation can also be compared under the other's sampling, i.e. with similar padding.
SIDES = {
    "posttrain": ("posttrain", {}),
    "posttrain-packing": ("posttrain", {"packing": True}),
    "trl": ("trl", {}),
    "posttrain-ungrouped": ("posttrain", {"group_by_length": False}),
    "trl-grouped": ("trl", {"group_by_length": True}),
}
# (posttrain side, TRL side) pairs to report ratios for, when both ran; the first is the headline.
PAIRS = [("posttrain", "trl"), ("posttrain-packing", "trl"), ("posttrain-ungrouped", "trl"),
         ("posttrain", "trl-grouped"), ("posttrain-ungrouped", "trl-grouped")]



# ---------------------------------------------------------------------------------------------------
# Children: one training run each. They write a JSON result and exit.
# ---------------------------------------------------------------------------------------------------

def child_posttrain(spec: dict, extra: dict) -> dict:
    t_setup = time.perf_counter()
    import posttrain.train.sft as sft_mod
    from posttrain.config import load_config
    from posttrain.train.loop import Trainer
    from posttrain.train.run_log import RunRecorder
    from posttrain.train.sft import run_sft

    # Time the training loop alone: from Trainer.train() until it starts writing the final model.
    # Also count batch cells (rows x width) to see how much padding each side computes.
    marks: dict = {"cells": 0}
    orig_train, orig_write, orig_collate = Trainer.train, RunRecorder.finish, sft_mod.collate

    def train(self):
        marks["start"] = time.perf_counter()
        return orig_train(self)

    def finish(self, *a, **kw):  # the loop's end: the final model is written from here
        marks.setdefault("end", time.perf_counter())
        return orig_write(self, *a, **kw)

    def collate(examples, pad_id):
        batch = orig_collate(examples, pad_id)
        marks["cells"] += batch["input_ids"].numel()
        return batch

    Trainer.train, RunRecorder.finish, sft_mod.collate = train, finish, collate

    overrides = [
        f"model_name_or_path={spec['model']}", f"dataset={spec['train']}", f"output_dir={spec['out']}",
        f"per_device_train_batch_size={spec['batch']}", "gradient_accumulation_steps=1",
        f"cutoff_len={spec['max_length']}", f"learning_rate={spec['lr']}", "weight_decay=0",
        "lr_scheduler_type=constant", "warmup_steps=0", "max_grad_norm=1.0", f"seed={spec['seed']}",
        f"logging_steps={spec['logging_steps']}", "save_steps=0", "disable_tqdm=true", "report_to=none",
        "plot_loss=false", "bf16=false", "fp16=false", "gradient_checkpointing=false",
    ]
    if spec.get("lora"):
        lora = spec["lora"]
        overrides += ["finetuning_type=lora", f"lora_rank={lora['r']}", f"lora_alpha={lora['alpha']}",
                      "lora_dropout=0.0", "lora_target=all"]
    if "group_by_length" in extra:
        overrides.append(f"group_by_length={str(extra['group_by_length']).lower()}")
    if extra.get("packing"):
        # Packed rows hold ~cutoff_len tokens each, so a fixed step count would be several epochs:
        # train the same number of passes over the data as the other sides instead.
        overrides += ["packing=true", "max_steps=-1", f"num_train_epochs={spec['epochs']}"]
    else:
        overrides += ["packing=false", f"max_steps={spec['steps']}"]
    result = run_sft(load_config("sft", None, overrides))
    logs = [r for r in result.metrics if "loss" in r]
    train_s = marks["end"] - marks["start"]
    return {
        "steps": result.global_step,
        "trained_tokens": sum(r["trained_tokens"] for r in logs),
        "batch_cells": marks["cells"],
        "train_s": train_s,
        "setup_s": time.perf_counter() - t_setup - train_s,
        "final_loss": result.train_loss,
        "loss_curve": [[r["step"], r["loss"]] for r in logs],
    }


def counting_sft_trainer():
    """TRL's SFTTrainer counting trained tokens the way posttrain does (positions whose next token has a
    label) and the batch cells it computes (trl is imported here: only the TRL child needs it)."""
    from trl import SFTTrainer

    class CountingSFTTrainer(SFTTrainer):
        trained_tokens = 0
        batch_cells = 0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                self.trained_tokens += int((inputs["labels"][:, 1:] != -100).sum())
                self.batch_cells += inputs["input_ids"].numel()
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    return CountingSFTTrainer


def child_trl(spec: dict, extra: dict) -> dict:
    t_setup = time.perf_counter()
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig

    CountingSFTTrainer = counting_sft_trainer()
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    tokenizer.chat_template = TAGGED_CHATML
    # The same load posttrain does (fp32, SDPA), rather than letting TRL pick.
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32, attn_implementation="sdpa")
    rows = [json.loads(line) for line in Path(spec["train"]).read_text().splitlines() if line.strip()]
    dataset = Dataset.from_list(rows)  # in memory: no Arrow cache to make a second run look faster
    config = SFTConfig(
        output_dir=spec["out"], max_steps=spec["steps"], per_device_train_batch_size=spec["batch"],
        gradient_accumulation_steps=1, learning_rate=spec["lr"], weight_decay=0.0,
        lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, seed=spec["seed"],
        optim="adamw_torch",  # posttrain uses torch.optim.AdamW (not fused)
        bf16=False, fp16=False, gradient_checkpointing=False,  # TRL defaults both on; posttrain runs fp32, no GC
        assistant_only_loss=True, max_length=spec["max_length"], packing=False,
        train_sampling_strategy="group_by_length" if extra.get("group_by_length") else "random",
        logging_steps=spec["logging_steps"], eval_strategy="no", save_strategy="no", report_to="none",
        disable_tqdm=True, dataloader_num_workers=0,
    )
    timer = train_timer()
    peft_config = None
    if spec.get("lora"):
        from peft import LoraConfig

        # "all-linear" is PEFT's name for what posttrain's lora_target: all means (every linear but the head).
        peft_config = LoraConfig(r=spec["lora"]["r"], lora_alpha=spec["lora"]["alpha"], lora_dropout=0.0,
                                 target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = CountingSFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                                 callbacks=[timer], peft_config=peft_config)
    trainer.train()
    trainer.save_model(spec["out"])
    logs = [r for r in trainer.state.log_history if "loss" in r]
    train_s = timer.end - timer.start
    return {
        "steps": trainer.state.global_step,
        "trained_tokens": trainer.trained_tokens,
        "batch_cells": trainer.batch_cells,
        "train_s": train_s,
        "setup_s": time.perf_counter() - t_setup - train_s,
        "final_loss": logs[-1]["loss"] if logs else None,
        "loss_curve": [[r["step"], r["loss"]] for r in logs],
    }


def run_child(side: str, spec_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    kind, extra = SIDES[side]
    result = (child_posttrain if kind == "posttrain" else child_trl)(spec, extra)
    result["peak_rss_mib"] = peak_rss_mib()
    import torch

    if torch.cuda.is_available():
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    Path(spec["result"]).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------------
# Parent: data, checks, the runs, held-out scoring, the report.
# ---------------------------------------------------------------------------------------------------

def prepare(work: Path, args) -> dict:
    from posttrain.data.synthetic import chat_corpus, write_jsonl
    from posttrain.model.tiny import write_tiny_model

    model = write_tiny_model(work / "model", size="small")
    # min_words/max_words widened from chat_corpus's defaults so lengths reach ~1k tokens (cutoff 1024).
    rows = chat_corpus(args.conversations + args.eval_conversations, seed=args.seed, min_words=10, max_words=1000)
    write_jsonl(rows[:args.conversations], work / "train.jsonl")
    write_jsonl(rows[args.conversations:], work / "heldout.jsonl")
    return {"model": str(model), "train": str(work / "train.jsonl"), "heldout": str(work / "heldout.jsonl")}


def posttrain_samples(model_dir: str, path: str, max_length: int):
    """Token ids + trained labels as posttrain builds them (the reference masks for both sides)."""
    from posttrain.data.chat import ChatRenderer
    from posttrain.data.formats import DatasetSpec, load_conversations
    from posttrain.data.prepare import tokenize_all
    from posttrain.model.loading import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    convs, _ = load_conversations([DatasetSpec(path=path)])
    return convs, tokenize_all(convs, ChatRenderer(tokenizer), max_length)[0], tokenizer


def check_masks(convs, samples, tokenizer) -> dict:
    """Does TRL see the same text, tokens and trained positions as posttrain? (Untruncated.)"""
    from posttrain.data.chat import IGNORE_INDEX

    text_diff = ids_diff = mask_diff = 0
    for conv, s in zip(convs, samples):
        msgs = [m.to_dict() for m in conv.messages]
        if tokenizer.apply_chat_template(msgs, tokenize=False) != \
                tokenizer.apply_chat_template(msgs, tokenize=False, chat_template=TAGGED_CHATML):
            text_diff += 1
        out = tokenizer.apply_chat_template(msgs, chat_template=TAGGED_CHATML, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        n = len(s.input_ids)  # posttrain's sample may be cut to max_length
        if out["input_ids"][:n] != s.input_ids:
            ids_diff += 1
        elif [int(m) for m in out["assistant_masks"][:n]] != [int(x != IGNORE_INDEX) for x in s.labels]:
            mask_diff += 1
    return {"checked": len(samples), "text_differs": text_diff, "ids_differ": ids_diff, "masks_differ": mask_diff}


def heldout_loss(model_dir: str, samples, batch: int = 8) -> float:
    """Mean next-token CE over trained (assistant) positions, with a plain transformers forward."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    folder = Path(model_dir)
    if (folder / "adapter_config.json").is_file():  # a LoRA run: its adapter over the base it was trained on
        from peft import PeftModel

        base = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), str(folder))
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    order = sorted(samples, key=lambda s: len(s.input_ids))
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(order), batch):
            chunk = order[i:i + batch]
            width = max(len(s.input_ids) for s in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            labels = torch.full((len(chunk), width), -100, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            for b, s in enumerate(chunk):
                n = len(s.input_ids)
                ids[b, :n], labels[b, :n], mask[b, :n] = torch.tensor(s.input_ids), torch.tensor(s.labels), 1
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
            target = labels[:, 1:]
            total += F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1),
                                     ignore_index=-100, reduction="sum").item()
            count += int((target != -100).sum())
    return total / count


def percentile(sorted_values: list[int], q: float) -> int:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="~1 minute smoke run (fewer conversations and steps)")
    p.add_argument("--conversations", type=int, help="training conversations (default 400; quick 64)")
    p.add_argument("--steps", type=int, help="optimizer steps (default: one pass over the data)")
    p.add_argument("--eval-conversations", type=int, help="held-out conversations (default 64; quick 16)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--lr", type=float, help="default 1e-4; with --lora 1e-3")
    p.add_argument("--lora", action="store_true", help="LoRA (rank 8, alpha 16, every linear layer) on both sides")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--logging-steps", type=int, help="default 10; quick 4 (TRL logs no loss for a last partial window)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--sides", default=None,
                   help=f"comma-separated, from {','.join(SIDES)} (default: posttrain,posttrain-packing,trl; "
                        "quick: posttrain,trl)")
    p.add_argument("--workdir", help="keep model, data and outputs here (default: a temp folder, removed)")
    p.add_argument("--child", choices=list(SIDES), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return run_child(args.child, Path(args.spec))

    args.lr = args.lr or (1e-3 if args.lora else 1e-4)
    args.conversations = args.conversations or (64 if args.quick else 400)
    args.eval_conversations = args.eval_conversations or (16 if args.quick else 64)
    per_epoch = math.ceil(args.conversations / args.batch)
    args.steps = args.steps or per_epoch
    args.logging_steps = args.logging_steps or (4 if args.quick else 10)
    sides = pick(p, args.sides, SIDES, "posttrain,trl" if args.quick else "posttrain,posttrain-packing,trl", "side")
    work = work_dir(args.workdir, "bench-sft-")

    paths = prepare(work, args)
    convs, train_samples, tokenizer = posttrain_samples(paths["model"], paths["train"], args.max_length)
    _, eval_samples, _ = posttrain_samples(paths["model"], paths["heldout"], args.max_length)
    full_lengths = sorted(len(tokenizer.apply_chat_template([m.to_dict() for m in c.messages], tokenize=True,
                                                            return_dict=True)["input_ids"]) for c in convs)
    trained = sum(sum(1 for x in s.labels[1:] if x != -100) for s in train_samples)
    masks = check_masks(convs, train_samples, tokenizer)
    data = {
        "conversations": len(convs), "heldout_conversations": len(eval_samples),
        "tokens": sum(full_lengths), "trained_tokens_per_pass": trained,
        "length_min": full_lengths[0], "length_median": percentile(full_lengths, 0.5),
        "length_p90": percentile(full_lengths, 0.9), "length_max": full_lengths[-1],
        "over_max_length": sum(n > args.max_length for n in full_lengths), "mask_check": masks,
    }
    print(f"data: {data['conversations']} conversations, {data['tokens']} tokens ({trained} trained per pass); "
          f"length min/median/p90/max = {data['length_min']}/{data['length_median']}/{data['length_p90']}/"
          f"{data['length_max']}; {data['over_max_length']} over max_length {args.max_length}")
    print(f"mask check (TRL tagged template vs posttrain renderer): {masks}")
    if masks["text_differs"] or masks["ids_differ"] or masks["masks_differ"]:
        print("WARNING: the two sides do not train the same tokens; the comparison is off", file=sys.stderr)

    spec = {**paths, "steps": args.steps, "epochs": args.steps / per_epoch, "batch": args.batch,
            "max_length": args.max_length, "lr": args.lr, "seed": args.seed, "logging_steps": args.logging_steps,
            "lora": {"r": args.lora_rank, "alpha": 2 * args.lora_rank} if args.lora else None}
    runs: dict[str, dict] = {}
    for side in sides:
        r = run_side(__file__, side, spec, work)
        r["trained_tokens_per_s"] = r["trained_tokens"] / r["train_s"]
        runs[side] = r
        print(f"{r['train_s']:.1f} s training, {r['trained_tokens_per_s']:.0f} trained tok/s "
              f"(load avg {r['load_avg_1m'][0]} -> {r['load_avg_1m'][1]})", flush=True)

    print("scoring held-out conversations ...", flush=True)
    base_eval = heldout_loss(paths["model"], eval_samples)
    for side, r in runs.items():
        r["heldout_loss"] = heldout_loss(str(work / f"out-{side}"), eval_samples)

    head = ["side", "steps", "trained tok", "batch cells", "train s", "setup s", "trained tok/s", "peak RSS MiB",
            "final train loss", "held-out loss"]
    rows = [[side, str(r["steps"]), str(r["trained_tokens"]), str(r["batch_cells"]), f"{r['train_s']:.1f}",
             f"{r['setup_s']:.1f}", f"{r['trained_tokens_per_s']:.0f}", f"{r['peak_rss_mib']:.0f}",
             fmt(r["final_loss"], ".4f"), f"{r['heldout_loss']:.4f}"] for side, r in runs.items()]
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    print()
    for row in [head, ["-" * w for w in widths], *rows]:
        print("  ".join(x.rjust(w) if i else x.ljust(w) for i, (x, w) in enumerate(zip(row, widths))))
    print(f"(held-out loss of the untrained model: {base_eval:.4f}; 'train s' is the training loop only, "
          "'setup s' is loading + tokenization + final save; 'batch cells' = rows x padded width computed; "
          "final train loss: posttrain = token-weighted mean over the last logging window, TRL = mean of its "
          "per-step losses over the window)")
    if "posttrain-packing" in runs:
        print("(posttrain-packing trains the same passes over the data in fewer, fuller steps, so its losses are "
              "not comparable with the other rows; read its throughput)")

    ratios = {}
    for a, b in PAIRS:
        if a in runs and b in runs:
            ratios[f"{a}/{b} throughput"] = runs[a]["trained_tokens_per_s"] / runs[b]["trained_tokens_per_s"]
            ratios[f"{a}/{b} peak RSS"] = runs[a]["peak_rss_mib"] / runs[b]["peak_rss_mib"]
            ratios[f"{a}-{b} held-out loss"] = runs[a]["heldout_loss"] - runs[b]["heldout_loss"]
    for k, v in ratios.items():
        print(f"{k}: {v:+.4f}" if k.endswith("loss") else f"{k}: {v:.2f}x")

    result = {
        "bench": "sft-lora" if args.lora else "sft", "quick": args.quick, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "settings": {k: spec[k] for k in ("steps", "batch", "max_length", "lr", "seed", "logging_steps")},
        "throughput": "trained (assistant, loss-bearing) tokens / training-loop wall time",
        "data": data, "heldout_loss_untrained": base_eval, "runs": runs, "ratios": ratios,
    }
    print(json.dumps(result))
    write_result(RESULTS.with_name("sft-lora.json") if args.lora else RESULTS, result)


if __name__ == "__main__":
    main()
