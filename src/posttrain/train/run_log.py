"""What every training run records, the same way for every stage (loop.Trainer and the RL trainer):

- the metrics window: objectives' {name: (sum, count)} added up where they live, reduced over ranks
  (one device read for all of them) when the window is logged;
- metrics.jsonl (and a tracker) through MetricsLogger, and the progress bar;
- the cadences: a log line every `logging_steps`, an evaluation every `eval_steps` (default: every
  ten logging windows), a checkpoint every `save_steps` (never at the last step: the final model is
  written then), and resuming from one;
- the divergence watch (divergence.py), checked before each checkpoint and at the end;
- the end of the run: finite weights checked, the final model written (`write_final`), its size
  logged, the logger closed, the curves plotted and metrics.jsonl read back.

What differs between stages (the step itself, what a log line holds) stays in each trainer.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from posttrain.model.adapters import model_bytes
from posttrain.train import checkpoint, distributed as dist
from posttrain.train.divergence import DivergenceWatch, check_finite_weights
from posttrain.train.reporting import MetricsLogger, plot_metrics, read_metrics


def add_metrics(into: dict[str, list], metrics: dict) -> None:
    """Adds each (sum, count) into `into`. A device tensor is added where it lives, never read back
    here: every read waits for the GPU to finish, and one per metric per micro-batch leaves it idle
    between small kernels; `reduce_metrics` reads them all at once."""
    for name, (total, count) in metrics.items():
        acc = into.setdefault(name, [0.0, 0.0])
        acc[0] = acc[0] + (total.detach() if torch.is_tensor(total) else total)
        acc[1] = acc[1] + (count.detach() if torch.is_tensor(count) else count)


def host_floats(values: list) -> list[float]:
    """Python floats of numbers and one-element tensors, with one device-to-host copy per device."""
    out = [v if torch.is_tensor(v) else float(v) for v in values]
    by_device: dict[torch.device, list[int]] = {}
    for i, v in enumerate(values):
        if torch.is_tensor(v):
            by_device.setdefault(v.device, []).append(i)
    for device, where in by_device.items():
        dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        host = torch.stack([values[i].reshape(()).to(dtype) for i in where]).cpu().tolist()
        for i, h in zip(where, host):
            out[i] = h
    return out


def reduce_metrics(sums: dict[str, list], prefix: str = "") -> dict[str, float]:
    """sum / count per name, over every rank (each rank reports the same names)."""
    if not sums:
        return {}
    names = sorted(sums)
    flat = host_floats([v for n in names for v in sums[n]])
    totals = dist.all_reduce_sum(torch.tensor(flat, dtype=torch.float64).view(-1, 2))
    return {prefix + n: round((t[0] / t[1]).item(), 6) for n, t in zip(names, totals) if t[1] > 0}


def write_final(output_dir: Path, save_final: Callable[[Path], None]) -> None:
    """Write the finished model next to a temp name, then move each file in; config.json (or
    adapter_config.json) goes last so a folder without it was never finished."""
    tmp = output_dir / f".tmp-final-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_final(tmp)
    checkpoint.fsync_tree(tmp)  # on disk before any name moves: a crash leaves no empty model file in place
    files = sorted(tmp.iterdir(), key=lambda p: p.name in ("config.json", "adapter_config.json"))
    for f in files:
        os.replace(f, output_dir / f.name)
    tmp.rmdir()
    checkpoint.fsync_dir(output_dir)


class RunRecorder:
    """One run's bookkeeping. `args` is the stage's config (output_dir, logging/eval/save steps,
    report_to, resume_from_checkpoint, save_total_limit, plot_loss, disable_tqdm, learning_rate).
    Made on every rank; only rank 0 writes."""

    def __init__(self, args, *, total_steps: int, desc: str, run_config: dict | None = None):
        self.args = args
        self.output_dir = Path(args.output_dir)
        self.total_steps = total_steps
        self.desc = desc
        self.run_config = run_config or {}
        self.eval_every = args.eval_steps or args.logging_steps * 10
        self.watch = DivergenceWatch(args.learning_rate)
        self.window: dict[str, list] = {}  # the objectives' metrics since the last log line
        self.logger: MetricsLogger | None = None
        self.bar = None
        if dist.is_main():
            checkpoint.remove_leftovers(self.output_dir)

    # -- resume and open --------------------------------------------------------------------------
    def resume(self, *, model, optimizer, scheduler, device: torch.device, parallel=None, module=None
               ) -> dict | None:
        """Load `resume_from_checkpoint` (if set and found) into the model, optimizer and scheduler
        (through `parallel` into a sharded `module`); the checkpoint's trainer state (with its `step` and
        `path`), or None for a fresh run."""
        path = checkpoint.resolve_resume(self.args.resume_from_checkpoint, self.output_dir)
        if path is None:
            return None
        state = checkpoint.load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler, device=device,
                                           parallel=parallel, module=module)
        return {**state, "path": path}

    def open(self, step: int) -> None:
        """metrics.jsonl (kept up to `step`, the step resumed from) and the progress bar."""
        self.logger = MetricsLogger(self.output_dir, self.args.report_to, self.run_config, resume_step=step) \
            if dist.is_main() else None
        self.bar = tqdm(total=self.total_steps, initial=step, disable=self.args.disable_tqdm or not dist.is_main(),
                        dynamic_ncols=True, desc=self.desc)

    # -- during the run ---------------------------------------------------------------------------
    def log(self, record: dict) -> None:
        if self.logger is not None:
            self.logger.log(record)

    def add(self, metrics: dict) -> None:
        add_metrics(self.window, metrics)

    def take_window(self) -> dict[str, float]:
        """The window's metrics over every rank (collective), and a fresh window."""
        out, self.window = reduce_metrics(self.window), {}
        return out

    def logs_at(self, step: int) -> bool:
        return step % self.args.logging_steps == 0 or step == self.total_steps

    def evaluates_at(self, step: int) -> bool:
        return step % self.eval_every == 0 or step == self.total_steps

    def saves_at(self, step: int) -> bool:
        return bool(self.args.save_steps) and step % self.args.save_steps == 0 and step < self.total_steps

    def save(self, step: int, *, model_state: dict, optimizer_state: dict | None, scheduler, trainer_state: dict,
             engine_writer: Callable[[Path], None] | None = None) -> None:
        """A checkpoint of a run that has not diverged (collective: every rank checks and waits). The
        states are whole on rank 0 (gathered from a sharded model by train/parallel.py); `engine_writer`
        (DeepSpeed) writes every rank's own part into the checkpoint's temporary folder first."""
        self.watch.check()
        tmp = None
        if engine_writer is not None:
            tmp = dist.broadcast_object(checkpoint.temp_checkpoint_dir(self.output_dir, step) if dist.is_main()
                                        else None)
            engine_writer(tmp)
            dist.barrier()
        if dist.is_main():
            checkpoint.save_checkpoint(self.output_dir, step, model_state=model_state, optimizer_state=optimizer_state,
                                       scheduler=scheduler, trainer_state=trainer_state,
                                       keep=self.args.save_total_limit, tmp=tmp)
        dist.barrier()

    # -- the end ----------------------------------------------------------------------------------
    def finish(self, step: int, model: torch.nn.Module, save_final: Callable[..., None], *, plot_name: str,
               parallel=None, saved_model: torch.nn.Module | None = None, **plot_options
               ) -> tuple[Path | None, list[dict]]:
        """Check the run and its weights, write the final model, log its size, close the log, plot
        (`plot_options` go to plot_metrics); (the plot or None, metrics.jsonl's records on rank 0).
        A sharded `saved_model` is gathered whole first (every rank takes part) and handed to
        `save_final(folder, state_dict=...)`; otherwise `save_final(folder)` saves the model as it is."""
        self.bar.close()
        self.watch.check()
        check_finite_weights(model)
        whole = parallel.full_model_state(saved_model) if parallel is not None and saved_model is not None else None
        plot = None
        if dist.is_main():
            write_final(self.output_dir, save_final if whole is None else lambda folder: save_final(folder,
                                                                                                   state_dict=whole))
            self.logger.log({"step": step, "output_weights_bytes": model_bytes(self.output_dir)})
            self.logger.close()
            if self.args.plot_loss:
                plot = plot_metrics(self.logger.path, self.output_dir / plot_name, **plot_options)
        dist.barrier()
        metrics = read_metrics(self.output_dir / "metrics.jsonl") if dist.is_main() else []
        return plot, metrics
