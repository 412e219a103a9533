"""The one training loop every objective runs through.

An objective is an `nn.Module` that takes a collated batch and returns the SUM of its loss over
the batch's trained units (tokens for SFT) plus that count. The loop divides by the number of
units in the whole optimizer step — over every micro-batch and every rank — so accumulating 4x2
gives the same update as one batch of 8, and N processes the same as one.

An objective may also return `metrics`: {name: (sum, count)} (e.g. the DPO reward accuracy summed
over the batch's pairs); the loop adds sums and counts up over each logging window (and over the
eval set) and logs sum / count under the name (`eval_<name>` for eval).

An objective may define `begin_step(batches)`: called on every rank with that rank's micro-batches
of an optimizer step (or its share of the eval set) before any of them goes through `forward`, for
a statistic taken over the whole step rather than one micro-batch (KTO's KL reference point), and
`end_step()`: called on every rank after them (BCO folds the step's rewards into its running mean).
Under DDP a rank with no rows left in a partial last step runs a zero-weight pass on a batch marked
`filler`, so that collective calls stay in step; running statistics skip it. An objective's own
persistent buffers (not its model's) are such statistics: checkpoints save and restore them.

How the objective runs over several processes (DDP, FSDP2, DeepSpeed ZeRO: wrap, one micro-batch's
backward, the optimizer step, checkpoint states) is train/parallel.py's, the same for every stage and
the RL update (rl/trainer.py, whose policy and value losses are objectives of this form). What a run
records (metrics.jsonl, cadences, checkpoints, the divergence watch, the final write) is
run_log.RunRecorder's.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from posttrain.config import TrainArgs
from posttrain.data.batching import example_length, plan_epoch
from posttrain.train import distributed as dist
from posttrain.errors import ConfigError
from posttrain.model.adapters import optimizer_groups
from posttrain.train.parallel import Parallel, local_numel
from posttrain.train.run_log import RunRecorder, add_metrics, host_floats, reduce_metrics

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    global_step: int
    train_loss: float | None
    eval_loss: float | None
    output_dir: Path
    plot: Path | None
    metrics: list[dict] = field(default_factory=list)
    objective: nn.Module | None = None  # the trained objective (its model in memory), for evaluation after training


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def build_optimizer(model: nn.Module, args: TrainArgs, fused: bool | None = None) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; fused where every parameter allows it (unless `fused` says)."""
    groups = optimizer_groups(model, args)
    if fused is None:
        fused = _fusable([p for g in groups for p in g["params"]])
    return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                             eps=args.adam_epsilon, fused=fused or None)


# The fused AdamW kernel updates every parameter in one pass: 5x faster than the default on a CPU
# (the small bench model: 6 ms against 31 per step) and one launch instead of several per tensor on a GPU.
FUSED_ADAMW_DEVICES = ("cpu", "cuda")
FUSED_ADAMW_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _fusable(params: list[torch.Tensor]) -> bool:
    return bool(params) and all(p.device.type in FUSED_ADAMW_DEVICES and p.dtype in FUSED_ADAMW_DTYPES
                                for p in params) and len({p.device for p in params}) == 1


def build_scheduler(optimizer, args: TrainArgs, total_steps: int):
    from transformers import get_scheduler

    warmup = args.warmup_steps or math.ceil(args.warmup_ratio * total_steps)
    name = args.lr_scheduler_type
    if name == "constant" and warmup:
        name = "constant_with_warmup"
    extra = {"min_lr_rate": 0.1} if name == "cosine_with_min_lr" else {}
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps,
                         scheduler_specific_kwargs=extra)


def autocast(device: torch.device, args: TrainArgs):
    if args.bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if args.fp16:
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


class Trainer:
    """Runs `objective` over `train_examples` with the settings in `args`.

    `count(batch)` gives the units a batch's loss sum is over; `save_final(folder)` writes the
    finished model (HF folder, adapter, ...) into a temporary folder the loop then moves in place.
    """

    def __init__(self, args: TrainArgs, objective: nn.Module, *, train_examples: list, eval_examples: list,
                 collate: Callable[[list], dict], count: Callable[[dict], int],
                 save_final: Callable[..., None], device: torch.device, run_config: dict | None = None,
                 summary: dict | None = None, saved_model: nn.Module | None = None,
                 before_save: Callable[..., None] | None = None):
        self.args = args
        self.objective = objective
        self.train_examples = train_examples
        self.eval_examples = eval_examples
        self.collate = collate
        self.count = count
        self.save_final = save_final
        self.saved_model = saved_model  # the model save_final writes (gathered whole first when sharded)
        self.before_save = before_save  # (parallel, objective), on every rank once training ends
        self.device = device
        self.run_config = run_config or {}
        self.summary = summary or {}  # logged once at step 0 (e.g. trainable parameter counts)
        self.output_dir = Path(args.output_dir)
        self.lengths = [example_length(e) for e in train_examples]
        self.world, self.rank = dist.world_size(), dist.rank()
        self.group_by_length = bool(getattr(args, "group_by_length", False))
        self.eval_metrics: dict[str, float] = {}  # the objective's metrics from the last evaluate()

    # -- planning ---------------------------------------------------------------------------------
    def epoch_plan(self, epoch: int) -> list[list[list[int]]]:
        return plan_epoch(self.lengths, epoch=epoch, seed=self.args.seed,
                          micro_batch_size=self.args.per_device_train_batch_size,
                          accumulation=self.args.gradient_accumulation_steps, world_size=self.world,
                          rank=self.rank, group_by_length=self.group_by_length)

    def total_steps(self) -> int:
        per_epoch = len(self.epoch_plan(0))
        if self.args.max_steps > 0:
            return self.args.max_steps
        return max(1, math.ceil(self.args.num_train_epochs * per_epoch))

    # -- one optimizer step -------------------------------------------------------------------------
    def _step(self, module: nn.Module, micro: list[list[int]], scaler, metrics: dict
              ) -> tuple[torch.Tensor | float, int, int]:
        batches = [self.collate([self.train_examples[i] for i in idx]) if idx else None for idx in micro]
        local = sum(self.count(b) for b in batches if b is not None)
        total = int(dist.all_reduce_sum(torch.tensor([local], dtype=torch.float64)).item())
        self._begin([b for b in batches if b is not None])
        loss_sum, tokens = 0.0, 0
        for k, batch in enumerate(batches):
            weight = 1.0
            if batch is None:  # this rank has no samples left in a partial last batch: a zero-weight pass
                batch, weight = self.collate([self.train_examples[0]]), 0.0
                batch["filler"] = True  # an objective's running statistics must not count it
            batch = _to(batch, self.device)
            out = self.parallel.backward(module, batch, scale=weight * self.world / max(total, 1),
                                         sync=k == len(batches) - 1, scaler=scaler,
                                         precision=autocast(self.device, self.args))
            if weight:
                loss_sum = loss_sum + out["loss_sum"].detach()  # read back once per logging window
                tokens += int(batch["num_tokens"])
                add_metrics(metrics, out.get("metrics", {}))
            else:  # the names with nothing counted: a window of filler passes only still reduces them with the others
                add_metrics(metrics, {name: (0.0, 0.0) for name in out.get("metrics", {})})
        end = getattr(self.objective, "end_step", None)
        if end is not None:
            end()
        return loss_sum, total, tokens

    def _begin(self, batches: list[dict]) -> None:
        """The objective's whole-step statistics, if it keeps any (see the module docstring)."""
        begin = getattr(self.objective, "begin_step", None)
        if begin is not None:
            with autocast(self.device, self.args), self.parallel.gathered(self.objective):
                begin(_to(b, self.device) for b in batches)

    @torch.no_grad()
    def evaluate(self, module: nn.Module) -> float | None:
        if not self.eval_examples:
            return None
        module.eval()
        bs = self.args.per_device_eval_batch_size
        mine = self.eval_examples[self.rank::self.world]
        mine = sorted(mine, key=example_length)  # similar lengths together: less padding
        loss_sum, units = 0.0, 0
        metrics: dict[str, list[float]] = {}
        batches = [self.collate(mine[i:i + bs]) for i in range(0, len(mine), bs)]
        self._begin(batches)
        # Every rank runs as many forwards as rank 0, which has the most rows: a sharded forward gathers the
        # weights with the other ranks, and every rank reduces the same metric names. A rank with fewer rows (fewer
        # rows than ranks: none) fills up with a row whose results it drops.
        most = math.ceil(math.ceil(len(self.eval_examples) / self.world) / bs)
        filler = [self.collate(self.eval_examples[:1])] * (most - len(batches)) if most > len(batches) else []
        for k, batch in enumerate(batches + filler):
            counted = k < len(batches)
            units += self.count(batch) if counted else 0  # counted on the host copy: no wait for the device
            batch = _to(batch, self.device)
            with autocast(self.device, self.args):
                out = module(batch)
            loss_sum = loss_sum + (out["loss_sum"].detach() if counted else 0.0)
            add_metrics(metrics, {name: value if counted else (0.0, 0.0)
                                  for name, value in out.get("metrics", {}).items()})
        sums = dist.all_reduce_sum(torch.tensor([*host_floats([loss_sum]), units], dtype=torch.float64))
        self.eval_metrics = reduce_metrics(metrics, "eval_")
        module.train()
        return (sums[0] / sums[1].clamp(min=1)).item()

    # -- the run ----------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        args = self.args
        seed_everything(args.seed)
        model = self.objective
        total_steps = self.total_steps()
        # Wrapped for the ranks (DDP, FSDP2 or ZeRO) before the optimizer is built: sharding replaces parameters.
        self.parallel = parallel = Parallel(args, self.device)
        module, optimizer, scheduler = parallel.prepare(model, total_steps)
        per_epoch = len(self.epoch_plan(0))
        run = RunRecorder(args, total_steps=total_steps, desc="train", run_config=self.run_config)
        if parallel.kind != "single":
            # Measured, not assumed: the parameters this rank holds after sharding, logged at step 0.
            self.summary = {**self.summary, "parallel": parallel.describe(), "rank0_params": local_numel(model)}
            if parallel.load_bytes:
                self.summary["load_bytes_per_rank"] = parallel.load_bytes
            if dist.is_main():
                log.info("training: %s; rank 0 holds %s parameters", parallel.describe(),
                         f"{self.summary['rank0_params']:,}")
        state = run.resume(model=model, optimizer=optimizer, scheduler=scheduler, device=self.device,
                           parallel=parallel, module=module)
        step = 0
        if state is not None:
            step = state["step"]
            if state.get("steps_per_epoch", per_epoch) != per_epoch:
                raise ConfigError(f"{state['path']}: the checkpoint was written with another data size or global "
                                  f"batch ({state['steps_per_epoch']} steps per epoch, now {per_epoch}); "
                                  "resume with the same data, batch size, accumulation and process count")
            if dist.is_main():
                log.info("resumed from %s (step %d of %d)", state["path"], step, total_steps)
        run.open(step)
        if step == 0 and self.summary:
            run.log({"step": 0, **self.summary})
        window_loss, window_units, window_tokens, window_start = 0.0, 0, 0, time.perf_counter()
        last_loss = last_eval = None
        # fp16 needs loss scaling so small gradients do not flush to zero; a no-op otherwise.
        scaler = torch.amp.GradScaler(self.device.type, enabled=args.fp16)
        module.train()
        while step < total_steps:
            epoch, offset = divmod(step, per_epoch)
            plan = self.epoch_plan(epoch)
            for micro in plan[offset:]:
                loss_sum, units, tokens = self._step(module, micro, scaler, run.window)
                grad_norm, lr = parallel.step(module, model, optimizer, scheduler, scaler, args.max_grad_norm)
                # Under fp16 an infinite gradient is the loss scaler's business (it skips that step).
                run.watch.note(step + 1, loss_sum, None if args.fp16 else grad_norm)
                step += 1
                window_loss += loss_sum
                window_units += units
                window_tokens += tokens
                if run.logs_at(step):
                    run.watch.check()
                    window_loss, *norm = host_floats([window_loss] + ([grad_norm] if grad_norm is not None else []))
                    stats = dist.all_reduce_sum(torch.tensor([window_loss, window_tokens], dtype=torch.float64))
                    elapsed = time.perf_counter() - window_start
                    last_loss = stats[0].item() / max(window_units, 1)
                    record = {"step": step, "epoch": round(step / per_epoch, 4), "loss": round(last_loss, 6),
                              "lr": lr, "tokens_per_s": round(stats[1].item() / elapsed, 1),
                              "trained_tokens": window_units}
                    if norm:
                        record["grad_norm"] = round(norm[0], 6)
                    record.update(run.take_window())
                    run.log(record)
                    run.bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}",
                                        tok_s=f"{record['tokens_per_s']:.0f}")
                    window_loss, window_units, window_tokens, window_start = 0.0, 0, 0, time.perf_counter()
                # Evaluation and checkpoints are not training: tokens/s leaves them out (on CUDA, once the step's
                # queued kernels have run, which are training).
                if self.device.type == "cuda" and (run.saves_at(step) or self.eval_examples and run.evaluates_at(step)):
                    torch.cuda.synchronize(self.device)
                paused = time.perf_counter()
                if self.eval_examples and run.evaluates_at(step):
                    last_eval = self.evaluate(module)
                    run.log({"step": step, "eval_loss": round(last_eval, 6), **self.eval_metrics})
                if run.saves_at(step):
                    run.save(step, model_state=parallel.trainable_state(model),
                             optimizer_state=parallel.optimizer_state(module, optimizer), scheduler=scheduler,
                             engine_writer=parallel.engine_writer({"objective": (module, optimizer)}),
                             trainer_state={"epoch": epoch, "steps_per_epoch": per_epoch})
                window_start += time.perf_counter() - paused
                run.bar.update(1)
                if step >= total_steps:
                    break
        if self.before_save is not None:
            self.before_save(parallel, model)
        plot, metrics = run.finish(step, model, self.save_final, plot_name="training_loss.png", parallel=parallel,
                                   saved_model=self.saved_model)
        return TrainResult(step, last_loss, last_eval, self.output_dir, plot, metrics, self.objective)
