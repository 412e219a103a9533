"""Where training numbers go: metrics.jsonl, an optional tracker, and a PNG of the curves."""

from __future__ import annotations

import importlib.util
import json
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
        self._tb = self._wandb = None
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(output_dir) / "runs"))
        elif report_to == "wandb":
            import wandb

            self._wandb = wandb.init(config=run_config or {}, dir=str(output_dir))

    def log(self, record: dict) -> None:
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
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


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
