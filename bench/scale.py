"""Sharded SFT on one machine: 1 process, DDP, FSDP2 and DeepSpeed ZeRO-3 (and each with offload) in
posttrain, against TRL's SFTTrainer under `accelerate launch` with the same DeepSpeed ZeRO-3 JSON.

    .venv/bin/python bench/scale.py                  # ~10 minutes on 2 CPU cores
    .venv/bin/python bench/scale.py --quick          # ~1-2 minute smoke run
    .venv/bin/python bench/scale.py --budget-gb 2    # the per-rank memory budget of the layer search

It needs the bench and scale extras (TRL, accelerate, DeepSpeed).

Two parts, every run in its own process group (torchrun or accelerate launch for 2 ranks), one after
the other:

1. Throughput: the same SFT (model, data, global batch, steps) through each strategy. Trained
   (assistant) tokens over the training loop's wall time, from the end of each engine's wrap
   (DDP / fully_shard / deepspeed.initialize) to the end of the last step; each rank's peak RSS at the
   end of the loop and over the whole run (which adds the final save: sharded weights are gathered
   whole on rank 0). One process trains the global batch as 2 accumulated micro-batches; every run
   gets the machine's threads split over its ranks.
2. The largest model each strategy trains within --budget-gb per rank: Llama models of the same
   width with 4, 8, 16, ... layers (--min-layers), a few short steps each, saved at the end as a
   user's run would be. The doubling stops at the first run that fails or in which any process passes
   the budget (stopped as soon as it does, so an over-budget run costs little and cannot exhaust the
   machine). The offload sides are searched only when named in --search-sides: offloading to CPU
   cannot lower a CPU machine's RSS.

The peer is TRL's SFTTrainer launched by `accelerate launch` with DeepSpeed and the same ZeRO-3 JSON
(accelerate's FSDP does not shard on CPU; its DeepSpeed path needs the process count corrected on
CPU, see count_processes). Ratios are posttrain / TRL on the same JSON. On a CPU machine "offload to
CPU" moves nothing off the host: those rows show what the engines' offload paths cost, not memory
saved. posttrain steps its own torch AdamW under DeepSpeed, so the offload JSON sets
zero_force_ds_cpu_optimizer: false and both sides step torch AdamW on the offloaded partitions
(DeepSpeed's CPU Adam, a native op compiled on first use, is used by neither side).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from common import peak_rss_mib, pick, run_side, train_timer, work_dir, write_result

# Nothing in this benchmark may reach a hub; set before transformers / datasets are imported.
for _k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_k, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "scale.json"

# LLaMA-Factory's ds_z3_config.json shape ("auto" filled from the run's keys on both sides), the one
# tests/test_sharded.py trains with.
ZERO3 = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
         "gradient_clipping": "auto", "zero_allow_untested_optimizer": True, "bf16": {"enabled": "auto"},
         "zero_optimization": {"stage": 3, "overlap_comm": False, "reduce_bucket_size": "auto",
                               "stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto",
                               "stage3_gather_16bit_weights_on_model_save": True}}
# ds_z3_offload_config.json's shape; without an accelerator there is nothing to pin. Both sides bring
# torch AdamW, which DeepSpeed refuses for offloaded optimizer state unless told not to force its own.
ZERO3_OFFLOAD = {**ZERO3, "zero_force_ds_cpu_optimizer": False,
                 "zero_optimization": {**ZERO3["zero_optimization"],
                                       "offload_param": {"device": "cpu", "pin_memory": False},
                                       "offload_optimizer": {"device": "cpu", "pin_memory": False}}}
DS_CONFIGS = {"zero3": ZERO3, "zero3-offload": ZERO3_OFFLOAD}

# name -> (implementation, processes, sharding: an fsdp value or a DS_CONFIGS name, or None).
SIDES = {
    "single": ("posttrain", 1, None),
    "ddp": ("posttrain", 2, None),
    "fsdp": ("posttrain", 2, "full_shard"),
    "fsdp-offload": ("posttrain", 2, "full_shard offload"),
    "zero3": ("posttrain", 2, "zero3"),
    "zero3-offload": ("posttrain", 2, "zero3-offload"),
    "trl-zero3": ("trl", 2, "zero3"),
    "trl-zero3-offload": ("trl", 2, "zero3-offload"),
}
PAIRS = [("zero3", "trl-zero3"), ("zero3-offload", "trl-zero3-offload")]  # (posttrain, TRL) on the same JSON
DEFAULT_SIDES = ",".join(SIDES)
# Offloading to CPU cannot lower a CPU machine's RSS, so the layer search leaves those sides out unless asked.
DEFAULT_SEARCH_SIDES = "single,ddp,fsdp,zero3,trl-zero3"
QUICK_SIDES = "zero3,trl-zero3"
QUICK_SEARCH_SIDES = "fsdp"


# ---------------------------------------------------------------------------------------------------
# Children: one rank of one training run each. Every rank writes result-SIDE.rankN.json and exits.
# ---------------------------------------------------------------------------------------------------

def child_posttrain(spec: dict, sharding: str | None) -> dict:
    t_setup = time.perf_counter()
    import posttrain.train.sft as sft_mod
    from posttrain.cli import main as posttrain_main
    from posttrain.train.parallel import Parallel
    from posttrain.train.run_log import RunRecorder

    # Time the training loop alone: from the end of the engine's wrap (TRL's clock starts after
    # accelerate's prepare too) until the final model starts being written; count the batch cells
    # (rows x width) this rank computes, to compare padding with TRL's.
    marks: dict = {"cells": 0}
    orig_prepare, orig_finish, orig_collate = Parallel.prepare, RunRecorder.finish, sft_mod.collate

    def prepare(self, *a, **kw):
        wrapped = orig_prepare(self, *a, **kw)
        marks["start"] = time.perf_counter()
        return wrapped

    def finish(self, *a, **kw):
        marks.setdefault("end", time.perf_counter())
        marks.setdefault("loop_peak", peak_rss_mib())
        return orig_finish(self, *a, **kw)

    def collate(examples, pad_id):
        batch = orig_collate(examples, pad_id)
        marks["cells"] += batch["input_ids"].numel()
        return batch

    Parallel.prepare, RunRecorder.finish, sft_mod.collate = prepare, finish, collate

    overrides = [
        f"model_name_or_path={spec['model']}", f"dataset={spec['train']}", f"output_dir={spec['out']}",
        f"per_device_train_batch_size={spec['batch']}", f"gradient_accumulation_steps={spec['accumulation']}",
        f"max_steps={spec['steps']}", f"cutoff_len={spec['max_length']}", f"learning_rate={spec['lr']}",
        "weight_decay=0", "lr_scheduler_type=constant", "warmup_steps=0", "max_grad_norm=1.0",
        f"seed={spec['seed']}", f"logging_steps={spec['logging_steps']}", "save_steps=0", "disable_tqdm=true",
        "report_to=none", "plot_loss=false", "bf16=false", "fp16=false", "gradient_checkpointing=false",
        "packing=false",
    ]
    if sharding in DS_CONFIGS:
        overrides.append(f"deepspeed={spec['ds_configs'][sharding]}")
    elif sharding:
        overrides.append(f"fsdp={sharding}")
    code = posttrain_main(["sft", *overrides])
    if code:
        sys.exit(code)
    train_s = marks["end"] - marks["start"]
    result = {"train_s": train_s, "setup_s": time.perf_counter() - t_setup - train_s, "batch_cells": marks["cells"],
              "loop_peak_rss_mib": marks["loop_peak"]}
    metrics = Path(spec["out"]) / "metrics.jsonl"
    if metrics.exists() and int(os.environ.get("RANK", "0")) == 0:  # rank 0 writes the run's log
        records = [json.loads(line) for line in metrics.read_text().splitlines()]
        logs = [r for r in records if "loss" in r]
        result.update(steps=logs[-1]["step"], trained_tokens=sum(r["trained_tokens"] for r in logs),
                      final_loss=logs[-1]["loss"], loss_curve=[[r["step"], r["loss"]] for r in logs],
                      strategy=records[0].get("parallel", "one process"),
                      rank0_params=records[0].get("rank0_params", records[0].get("total_params")))
    return result


def child_trl(spec: dict, sharding: str | None) -> dict:
    t_setup = time.perf_counter()
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig

    from sft import TAGGED_CHATML, counting_sft_trainer

    CountingSFTTrainer = counting_sft_trainer()
    # The config first: under `accelerate launch --use_deepspeed` it turns ZeRO-3 on, so the trainer
    # then loads the model partitioned (zero.Init), as TRL's documented DeepSpeed recipe does.
    config = SFTConfig(
        output_dir=spec["out"], max_steps=spec["steps"], per_device_train_batch_size=spec["batch"],
        gradient_accumulation_steps=spec["accumulation"], learning_rate=spec["lr"], weight_decay=0.0,
        lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, seed=spec["seed"],
        optim="adamw_torch",  # posttrain's torch.optim.AdamW
        bf16=False, fp16=False, gradient_checkpointing=False,  # posttrain runs fp32, no GC
        assistant_only_loss=True, max_length=spec["max_length"], packing=False,
        train_sampling_strategy="group_by_length",  # posttrain groups by length by default
        logging_steps=spec["logging_steps"], eval_strategy="no", save_strategy="no", report_to="none",
        disable_tqdm=True, dataloader_num_workers=0,
        model_init_kwargs={"dtype": "float32", "attn_implementation": "sdpa"},  # the load posttrain does
    )
    count_processes(config.distributed_state)
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    tokenizer.chat_template = TAGGED_CHATML
    rows = [json.loads(line) for line in Path(spec["train"]).read_text().splitlines() if line.strip()]
    timer = train_timer()
    trainer = CountingSFTTrainer(model=spec["model"], args=config, train_dataset=Dataset.from_list(rows),
                                 processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    trainer.save_model(spec["out"])
    train_s = timer.end - timer.start
    logs = [r for r in trainer.state.log_history if "loss" in r]
    result = {"train_s": train_s, "setup_s": time.perf_counter() - t_setup - train_s,
              "batch_cells": trainer.batch_cells, "loop_peak_rss_mib": timer.peak_rss_mib,
              "trained_tokens_this_rank": trainer.trained_tokens}
    if trainer.is_world_process_zero():
        result.update(steps=trainer.state.global_step, final_loss=logs[-1]["loss"] if logs else None,
                      loss_curve=[[r["step"], r["loss"]] for r in logs],
                      strategy=f"TRL + accelerate DeepSpeed ZeRO-3 over {trainer.args.world_size} processes"
                      + (", offload to CPU" if sharding == "zero3-offload" else ""),
                      # what rank 0 holds: its ZeRO-3 partitions (as posttrain's log measures its own)
                      rank0_params=sum(getattr(p, "ds_tensor", p).numel() for p in trainer.model.parameters()))
    return result


def count_processes(state) -> None:
    """accelerate 1.15 on a machine without an accelerator starts DeepSpeed's process group over every rank
    but records one process (it finds no device backend): HF then fills DeepSpeed's "auto" batch size for
    one process, which DeepSpeed refuses, and accelerate's data loader would not split batches over the
    ranks (it shards by that count). Its shared state is given the group's real size and this rank's
    place before the trainer reads them."""
    import torch.distributed as tdist

    if tdist.is_initialized() and state.num_processes != tdist.get_world_size():
        state.num_processes, state.process_index = tdist.get_world_size(), tdist.get_rank()
        state.local_process_index = int(os.environ.get("LOCAL_RANK", tdist.get_rank()))


def run_child(side: str, spec_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    kind, _, sharding = SIDES[side]
    result = (child_posttrain if kind == "posttrain" else child_trl)(spec, sharding)
    result["peak_rss_mib"] = peak_rss_mib()
    rank = int(os.environ.get("RANK", "0"))
    Path(spec["result"]).with_name(f"result-{side}.rank{rank}.json").write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------------
# Parent: data, models, the runs, the report.
# ---------------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(side: str, spec: dict, work: Path, threads: int, rss_limit_mib: float | None = None) -> dict:
    """One run of `side` (one process, or 2 ranks under torchrun / accelerate launch), merged over its
    ranks: the slowest rank's loop time, trained tokens of all ranks, every rank's peak RSS."""
    kind, procs, sharding = SIDES[side]
    if procs == 1:
        launcher = None
    elif kind == "trl":
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed",
                    "--deepspeed_config_file", spec["ds_configs"][sharding], "--num_processes", str(procs),
                    "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
                    "--dynamo_backend", "no"]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads // procs))}
    run_spec = {**spec, "accumulation": 2 // procs}  # the same global batch on 1 or 2 processes
    r = run_side(__file__, side, run_spec, work, launcher=launcher, env=env, rss_limit_mib=rss_limit_mib,
                 must_pass=rss_limit_mib is None)
    if "ranks" not in r:  # stopped over the limit, or failed
        return r
    ranks = r.pop("ranks")
    first = ranks[0]
    out = {k: first[k] for k in ("strategy", "rank0_params", "steps", "final_loss", "loss_curve") if k in first}
    out["trained_tokens"] = first.get("trained_tokens", sum(x.get("trained_tokens_this_rank", 0) for x in ranks))
    out["batch_cells"] = sum(x["batch_cells"] for x in ranks)
    out["train_s"] = max(x["train_s"] for x in ranks)
    out["setup_s"] = max(x["setup_s"] for x in ranks)
    out["trained_tokens_per_s"] = out["trained_tokens"] / out["train_s"]
    out["loop_peak_rss_mib"] = [round(x["loop_peak_rss_mib"], 1) for x in ranks]
    out["peak_rss_mib"] = [round(x["peak_rss_mib"], 1) for x in ranks]
    return {**out, **r}


def model_shape(width: int, layers: int) -> dict:
    """A Llama shape at this width: 64-wide heads, half as many KV heads, an MLP 8/3 wide (to 32)."""
    heads = max(1, width // 64)
    return {"hidden_size": width, "intermediate_size": -(-8 * width // 3 // 32) * 32, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": max(1, heads // 2)}


def write_model(folder: Path, width: int, layers: int, seed: int) -> dict:
    from safetensors import safe_open

    from posttrain.model.tiny import write_tiny_model

    shape = model_shape(width, layers)
    write_tiny_model(folder, size="small", seed=seed, **shape)
    with safe_open(folder / "model.safetensors", "pt") as f:  # the tied head is stored once
        params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return {"path": str(folder), "layers": layers, "params": params, **shape}


def search(side: str, spec: dict, models, work: Path, args) -> dict:
    """The largest layer count `side` trains with every process under the budget, doubling from
    --min-layers; each attempt's per-rank peaks (or why it stopped)."""
    attempts, best, layers = [], None, args.min_layers
    limit = args.budget_gb * 1024
    while layers <= args.max_layers:
        model = models(layers)
        trial = work / f"search-{side}-{layers}"
        trial.mkdir(exist_ok=True)
        r = launch(side, {**spec, "model": model["path"]}, trial, args.threads, rss_limit_mib=limit)
        attempt = {"layers": layers, "params": model["params"], "process_s": round(r["process_s"], 1)}
        if "peak_rss_mib" in r:
            attempt["peak_rss_mib"] = r["peak_rss_mib"]
            fits = max(r["peak_rss_mib"]) <= limit  # the poll may miss a peak between two reads
            print(f"per-rank peak {ranks_text(r['peak_rss_mib'])} MiB"
                  + ("" if fits else f": over the budget of {limit:.0f}"), flush=True)
        else:
            fits = False
            attempt.update({k: r[k] for k in ("over_limit_mib", "failed") if k in r})
        attempts.append(attempt)
        shutil.rmtree(trial)  # the saved model and logs; the next attempt's may be twice the size
        if not fits:
            break
        best = attempt
        layers *= 2
    return {"largest_layers": best and best["layers"], "largest_params": best and best["params"],
            "hit_max_layers": bool(best) and best["layers"] * 2 > args.max_layers, "attempts": attempts}


def ranks_text(values: list[float]) -> str:
    return "/".join(f"{v:.0f}" for v in values)


def print_table(head: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    print()
    for row in [head, ["-" * w for w in widths], *rows]:
        print("  ".join(x.rjust(w) if i else x.ljust(w) for i, (x, w) in enumerate(zip(row, widths))))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="~1-2 minute smoke run (fewer sides, steps and layers)")
    p.add_argument("--budget-gb", type=float, help="per-rank memory budget of the layer search, in GiB "
                                                   "(default 1.5; quick 1.0)")
    p.add_argument("--sides", help=f"throughput runs, comma-separated from {','.join(SIDES)} "
                                   f"(default: all; quick: {QUICK_SIDES})")
    p.add_argument("--search-sides", help=f"layer-search runs, the same names, or 'none' "
                                          f"(default: {DEFAULT_SEARCH_SIDES}; quick: {QUICK_SEARCH_SIDES})")
    p.add_argument("--width", type=int, default=512, help="hidden size of every model (default 512)")
    p.add_argument("--layers", type=int, default=4, help="layers of the throughput model (default 4)")
    p.add_argument("--min-layers", type=int, help="the layer search starts here and doubles (default 4; quick 2)")
    p.add_argument("--max-layers", type=int, help="the layer search stops here (default 64; quick 4)")
    p.add_argument("--steps", type=int, help="throughput optimizer steps, one pass over as many conversations as "
                                             "they train (default 12; quick 3)")
    p.add_argument("--search-steps", type=int, default=2, help="optimizer steps of each layer-search run")
    p.add_argument("--batch", type=int, default=4, help="micro-batch per rank; the global batch is twice that")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--search-max-length", type=int, default=64,
                   help="cutoff of the layer-search runs (small: the search is about model state, not activations)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads per run, split over its "
                                                                        "ranks (default: every core)")
    p.add_argument("--workdir", help="keep models, data and outputs here (default: a temp folder, removed)")
    p.add_argument("--child", choices=list(SIDES), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return run_child(args.child, Path(args.spec))

    args.budget_gb = args.budget_gb or (1.0 if args.quick else 1.5)
    args.min_layers = args.min_layers or (2 if args.quick else 4)
    args.max_layers = args.max_layers or (4 if args.quick else 64)
    args.steps = args.steps or (3 if args.quick else 12)
    # One pass over the data: both sides train the same conversations, whatever order each samples them in.
    args.conversations = args.steps * 2 * args.batch
    sides = pick(p, args.sides, SIDES, QUICK_SIDES if args.quick else DEFAULT_SIDES, "side")
    search_sides = [] if args.search_sides == "none" else \
        pick(p, args.search_sides, SIDES, QUICK_SEARCH_SIDES if args.quick else DEFAULT_SEARCH_SIDES, "side")
    work = work_dir(args.workdir, "bench-scale-")
    t_start = time.perf_counter()

    from posttrain.data.synthetic import chat_corpus, write_jsonl
    from sft import check_masks, posttrain_samples

    # Conversations of tens to a few hundred tokens, some cut at --max-length.
    write_jsonl(chat_corpus(args.conversations, seed=args.seed, min_words=10, max_words=300), work / "train.jsonl")
    model = write_model(work / "model", args.width, args.layers, args.seed)
    convs, samples, tokenizer = posttrain_samples(model["path"], str(work / "train.jsonl"), args.max_length)
    masks = check_masks(convs, samples, tokenizer)
    print(f"model: {model['params']:,} parameters ({args.layers} layers of width {args.width}); "
          f"data: {len(convs)} conversations; mask check (TRL tagged template vs posttrain renderer): {masks}")
    if masks["text_differs"] or masks["ids_differ"] or masks["masks_differ"]:
        print("WARNING: the two sides do not train the same tokens; the comparison is off", file=sys.stderr)
    ds_configs = {}
    for name, config in DS_CONFIGS.items():
        ds_configs[name] = str(work / f"ds_{name.replace('-', '_')}.json")
        Path(ds_configs[name]).write_text(json.dumps(config, indent=2))

    spec = {"model": model["path"], "train": str(work / "train.jsonl"), "ds_configs": ds_configs,
            "steps": args.steps, "batch": args.batch, "max_length": args.max_length, "lr": args.lr,
            "seed": args.seed, "logging_steps": max(1, args.steps // 4)}
    runs: dict[str, dict] = {}
    for side in sides:
        r = launch(side, spec, work, args.threads)
        runs[side] = r
        print(f"{r['train_s']:.1f} s training, {r['trained_tokens_per_s']:.0f} trained tok/s, per-rank peak "
              f"{ranks_text(r['peak_rss_mib'])} MiB (load avg {r['load_avg_1m'][0]} -> {r['load_avg_1m'][1]})",
              flush=True)

    searched: dict[str, dict] = {}
    if search_sides:
        built: dict[int, dict] = {}

        def models(layers: int) -> dict:
            if layers not in built:
                built[layers] = write_model(work / f"model-{layers}", args.width, layers, args.seed)
            return built[layers]

        search_spec = {**spec, "steps": args.search_steps, "batch": 2, "max_length": args.search_max_length,
                       "logging_steps": 1}
        print(f"layer search: width {args.width}, {args.min_layers} to {args.max_layers} layers, "
              f"budget {args.budget_gb} GiB per rank")
        for side in search_sides:
            searched[side] = search(side, search_spec, models, work, args)
        for folder in built.values():
            shutil.rmtree(folder["path"])

    single = runs.get("single")
    head = ["side", "strategy", "steps", "trained tok", "batch cells", "train s", "trained tok/s", "vs 1 process",
            "loop peak RSS MiB/rank", "run peak RSS MiB/rank", "final loss"]
    print_table(head, [[side, r.get("strategy", "-"), str(r.get("steps", "-")), str(r["trained_tokens"]),
                        str(r["batch_cells"]), f"{r['train_s']:.1f}", f"{r['trained_tokens_per_s']:.0f}",
                        f"{r['trained_tokens_per_s'] / single['trained_tokens_per_s']:.2f}x" if single else "-",
                        ranks_text(r["loop_peak_rss_mib"]), ranks_text(r["peak_rss_mib"]),
                        "-" if r.get("final_loss") is None else f"{r['final_loss']:.4f}"]
                       for side, r in runs.items()])
    print("('train s': the training loop after each engine's wrap, slowest rank; 'loop peak': RSS at the end of the "
          "loop, 'run peak': the whole process, final save included; one process accumulates 2 micro-batches per "
          "step, so every row trains the same global batch; final loss: posttrain = token-weighted mean over the "
          "last logging window, TRL = mean of its per-step losses over it, each in its own batch order)")
    if searched:
        print_table(["side", f"largest within {args.budget_gb} GiB/rank", "parameters", "attempts: layers -> "
                     "per-rank peak MiB"],
                    [[side, f"{s['largest_layers']} layers" if s["largest_layers"] else "none",
                      f"{s['largest_params']:,}" if s["largest_params"] else "-",
                      "; ".join(f"{a['layers']} -> " + (ranks_text(a["peak_rss_mib"]) if "peak_rss_mib" in a else
                                                       f"stopped at {a['over_limit_mib']:.0f}" if "over_limit_mib" in a
                                                       else a["failed"]) for a in s["attempts"])
                      + (" (the --max-layers cap)" if s["hit_max_layers"] else "")]
                     for side, s in searched.items()])

    ratios = {}
    for a, b in PAIRS:
        if a in runs and b in runs:
            ratios[f"{a}/{b} throughput"] = runs[a]["trained_tokens_per_s"] / runs[b]["trained_tokens_per_s"]
            ratios[f"{a}/{b} loop peak RSS"] = max(runs[a]["loop_peak_rss_mib"]) / max(runs[b]["loop_peak_rss_mib"])
            ratios[f"{a}/{b} run peak RSS"] = max(runs[a]["peak_rss_mib"]) / max(runs[b]["peak_rss_mib"])
        if a in searched and b in searched and searched[a]["largest_params"] and searched[b]["largest_params"]:
            ratios[f"{a}/{b} largest model"] = searched[a]["largest_params"] / searched[b]["largest_params"]
    print()
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}x (posttrain / TRL, highest rank)" if "RSS" in k else f"{k}: {v:.2f}x")
    if any(SIDES[side][2] and "offload" in SIDES[side][2] for side in [*runs, *searched]):
        print("(offload rows: on a CPU machine nothing leaves the host, so they show the offload paths' cost; both "
              "sides step torch AdamW under DeepSpeed (zero_force_ds_cpu_optimizer: false): DeepSpeed's CPU Adam, a "
              "native op compiled on first use, is left out)")
    total_s = time.perf_counter() - t_start
    print(f"bench time: {total_s:.0f} s")

    result = {
        "bench": "scale", "quick": args.quick, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "bench_s": round(total_s),
        "settings": {"steps": args.steps, "batch_per_rank": args.batch, "global_batch": 2 * args.batch,
                     "max_length": args.max_length, "lr": args.lr, "seed": args.seed, "threads": args.threads,
                     "conversations": args.conversations},
        "throughput": "trained (assistant, loss-bearing) tokens / training-loop wall time (slowest rank)",
        "model": {k: v for k, v in model.items() if k != "path"}, "mask_check": masks,
        "deepspeed_configs": DS_CONFIGS, "runs": runs,
        "search": {"budget_gb": args.budget_gb, "width": args.width, "steps": args.search_steps, "batch_per_rank": 2,
                   "max_length": args.search_max_length, "min_layers": args.min_layers,
                   "max_layers": args.max_layers, "sides": searched},
        "ratios": ratios,
    }
    write_result(RESULTS, result)


if __name__ == "__main__":
    main()
