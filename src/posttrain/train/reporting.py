"""Where training numbers go: metrics.jsonl, an optional tracker, and a PNG of the curves.

Beside metrics.jsonl a run keeps `run_status.json` (read by `posttrain board`): "running" with the
process id from its first line, then "finished" when the final model is in place, "failed" with the
error when the process ends on one, "killed" when interrupted. A process killed outright writes
nothing more: its status stays "running" with a pid that is gone, which the board reads as killed.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import socket
import sys
import time
from pathlib import Path

from posttrain.errors import ConfigError


def check_tracker(report_to: str) -> None:
    """Fail before training if the asked-for tracker is not installed."""
    package = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(report_to)
    if package and importlib.util.find_spec(package) is None:
        raise ConfigError(f"report_to: {report_to!r} needs the {package!r} package, which is not installed; "
                          f"`pip install {package}` or set report_to: none")


class MetricsLogger:
    """Appends one JSON line per logging event; mirrors to tensorboard / wandb when asked."""

    def __init__(self, output_dir: str | Path, report_to: str = "none", run_config: dict | None = None,
                 resume_step: int = 0):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():  # keep only lines up to the step we resume from
            kept = [l for l in self.path.read_text().splitlines()
                    if l.strip() and json.loads(l).get("step", 0) <= resume_step]
            self.path.write_text("".join(l + "\n" for l in kept))
        self.status_path = Path(output_dir) / STATUS_FILE
        self._started = time.time()
        write_status(self.status_path, {"status": "running", "pid": os.getpid(), "host": socket.gethostname(),
                                        "started": self._started, "resumed_from_step": resume_step})
        _OPEN[self.status_path] = self._started
        self._tb = self._wandb = None
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(output_dir) / "runs"))
        elif report_to == "wandb":
            import wandb

            self._wandb = wandb.init(config=run_config or {}, dir=str(output_dir))

    def log(self, record: dict) -> None:
        record = {**record, "wall_time_s": round(time.time(), 3)}  # the x axis by time (varies, as *_s do)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        step = record.get("step", 0)
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        """The run is done: its final model is written (every stage closes its logger after that)."""
        if _OPEN.pop(self.status_path, None) is not None:
            write_status(self.status_path, {"status": "finished", "pid": os.getpid(), "host": socket.gethostname(),
                                            "started": self._started, "ended": time.time()})
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


STATUS_FILE = "run_status.json"
_OPEN: dict[Path, float] = {}  # run_status.json of every run this process has started and not finished


def write_status(path: Path, status: dict) -> None:
    """Temp file, then rename: a reader never sees half a status."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(status) + "\n")
        os.replace(tmp, path)
    except OSError:  # the folder went away (a test's temp dir, a user's rm): nothing left to describe
        tmp.unlink(missing_ok=True)


def end_open_runs(status: str, error: str | None = None) -> None:
    """Record how the process ended for every run it left unfinished (the CLI calls this on an error
    or Ctrl-C; an uncaught exception reaches it at exit)."""
    for path, started in list(_OPEN.items()):
        write_status(path, {"status": status, "pid": os.getpid(), "host": socket.gethostname(), "started": started,
                            "ended": time.time(), **({"error": error} if error else {})})
        _OPEN.pop(path, None)


@atexit.register
def _at_exit() -> None:
    if _OPEN:  # a run still open at exit ended on an exception nobody caught (or sys.exit mid-run)
        err = getattr(sys, "last_value", None)
        end_open_runs("failed", f"{type(err).__name__}: {err}" if err is not None else "the process exited mid-run")


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]


def plot_metrics(metrics_path: str | Path, png_path: str | Path, keys: tuple[str, ...] = ("loss", "eval_loss"),
                 title: str = "loss", extra_keys: tuple[str, ...] = ("lr", "grad_norm")) -> Path | None:
    """`keys` share the first panel (titled `title`); each of `extra_keys` with data gets its own, against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    series = {k: [(r["step"], r[k]) for r in records if k in r] for k in keys}
    series = {k: v for k, v in series.items() if v}
    extra = {k: [(r["step"], r[k]) for r in records if k in r] for k in extra_keys}
    extra = {k: v for k, v in extra.items() if v}
    if not series:
        return None
    fig, axes = plt.subplots(1, 1 + len(extra), figsize=(5 * (1 + len(extra)), 3.6), squeeze=False)
    ax = axes[0][0]
    for k, pts in series.items():
        ax.plot(*zip(*pts), marker="o" if len(pts) < 30 else None, label=k)
    ax.set_xlabel("step"), ax.set_title(title), ax.legend(), ax.grid(alpha=0.3)
    for ax, (k, pts) in zip(axes[0][1:], extra.items()):
        ax.plot(*zip(*pts)), ax.set_xlabel("step"), ax.set_title(k), ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return Path(png_path)
