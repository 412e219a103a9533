"""The run folders under RUNS_DIR, read from the files runs already write: nothing here writes.

A run is any folder holding a `metrics.jsonl`. Its status:

  finished  run_status.json says so (written once the final model is in place), or, for runs from
            before run_status.json, the folder holds a final model (config.json / adapter_config.json)
  failed    run_status.json records the error the process ended on
  killed    run_status.json says interrupted, or still says running but its process is gone (same
            host), or, without run_status.json, metrics stopped with no final model
  running   run_status.json says running and its process lives (on another host: wrote metrics in the
            last hour), or, without run_status.json, metrics.jsonl was written in the last STALE_S seconds

Run ids are paths relative to RUNS_DIR; every lookup resolves inside RUNS_DIR or is refused.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import yaml

STALE_S = 120.0  # without a status file, a run whose metrics are older than this is no longer running
REMOTE_STALE_S = 3600.0  # a run on another host (shared disk) whose metrics are this old is taken as gone
SKIP_DIRS = ("checkpoint-", ".", "__pycache__", "wandb")
HEADLINES = {  # the figure the runs list shows for each stage: the first of these the run has logged
    "sft": ("eval_loss", "loss"),
    "rm": ("eval_accuracy", "accuracy", "eval_loss", "loss"),
    "dpo": ("eval_rewards/accuracy", "rewards/accuracy", "eval_loss", "loss"),
    "kto": ("eval_rewards/margin", "rewards/margin", "eval_loss", "loss"),
    "ppo": ("eval_reward", "reward_mean"),
    "grpo": ("eval_reward", "reward_mean"),
}


class UnknownRun(LookupError):
    """A run id that names no run inside RUNS_DIR (or points outside it)."""


def find_runs(root: Path, max_depth: int = 6) -> list[Path]:
    """Every folder under `root` (itself included) that holds a metrics.jsonl, not following links out."""
    root = root.resolve()
    found = []
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        depth = len(here.relative_to(root).parts)
        dirs[:] = sorted(d for d in dirs if not d.startswith(SKIP_DIRS) and depth < max_depth
                         and not (here / d).is_symlink())
        if "metrics.jsonl" in files and _inside(here / "metrics.jsonl", root):
            found.append(here)
    return found


def _inside(path: Path, root: Path) -> bool:
    try:
        real = path.resolve()
    except (OSError, RuntimeError):
        return False
    return real == root or root in real.parents


def run_id(root: Path, folder: Path) -> str:
    rel = folder.resolve().relative_to(root.resolve()).as_posix()
    return rel if rel != "." else root.resolve().name


def resolve_run(root: Path, rid: str) -> Path:
    """The folder of run `rid`, which must be a run inside `root`; anything else is UnknownRun."""
    root = root.resolve()
    if rid == root.name and (root / "metrics.jsonl").is_file():
        return root
    parts = Path(rid).parts
    if not rid or Path(rid).is_absolute() or ".." in parts or "\\" in rid or "\0" in rid:
        raise UnknownRun(rid)
    folder = root / rid
    if not (_inside(folder, root) and _inside(folder / "metrics.jsonl", root) and (folder / "metrics.jsonl").is_file()):
        raise UnknownRun(rid)
    return folder.resolve()


class FileCache:
    """Parsed files, re-read only when their size or mtime changes (the page polls every few seconds)."""

    def __init__(self):
        self._cache: dict[Path, tuple[tuple[int, int], object]] = {}

    def get(self, path: Path, parse):
        try:
            st = path.stat()
        except OSError:
            return None
        key = (st.st_mtime_ns, st.st_size)
        hit = self._cache.get(path)
        if hit and hit[0] == key:
            return hit[1]
        value = parse(path)
        self._cache[path] = (key, value)
        return value


def read_jsonl(path: Path) -> list[dict]:
    """Lines that parse (the last one may be half-written while the run goes)."""
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                out.append(row)
    return out


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, ValueError, TypeError):
        return True  # someone else's process, or unknowable: do not call it dead
    return True


def run_status(folder: Path, status_file: dict | None, metrics_mtime: float) -> dict:
    has_final = (folder / "config.json").is_file() or (folder / "adapter_config.json").is_file()
    if status_file:
        state = status_file.get("status")
        if state == "running" and status_file.get("host") == socket.gethostname() \
                and not _pid_alive(status_file.get("pid")):
            return {"status": "killed", "reason": f"process {status_file.get('pid')} is gone"}
        if state == "running" and status_file.get("host") != socket.gethostname() \
                and time.time() - metrics_mtime > REMOTE_STALE_S:
            return {"status": "killed", "reason": f"no metrics for an hour from host {status_file.get('host')}"}
        if state in ("running", "finished", "failed", "killed"):
            return {"status": state, **({"reason": status_file["error"]} if status_file.get("error") else {})}
    if has_final:
        return {"status": "finished"}
    if time.time() - metrics_mtime < STALE_S:
        return {"status": "running"}
    return {"status": "killed", "reason": "metrics stopped without a final model"}


class Runs:
    """The runs under one RUNS_DIR, with their files cached."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.cache = FileCache()

    def folder(self, rid: str) -> Path:
        return resolve_run(self.root, rid)

    def metrics(self, folder: Path) -> list[dict]:
        return self.cache.get(folder / "metrics.jsonl", read_jsonl) or []

    def config(self, folder: Path) -> dict:
        return self.cache.get(folder / "posttrain_config.yaml", read_yaml) or {}

    def rollouts(self, folder: Path) -> list[dict]:
        return self.cache.get(folder / "rollouts.jsonl", read_jsonl) or []

    def summary(self, folder: Path) -> dict:
        """What the runs list shows and /api/runs returns for one run."""
        records = self.metrics(folder)
        config = self.config(folder)
        status_file = self.cache.get(folder / "run_status.json", read_json)
        mtime = (folder / "metrics.jsonl").stat().st_mtime
        state = run_status(folder, status_file, mtime)
        last = {}
        for r in records:  # the latest value of each metric
            last.update({k: v for k, v in r.items() if isinstance(v, (int, float)) and not k.startswith("alarm/")})
        stage = config.get("stage") or "?"
        headline = next(((k, last[k]) for k in HEADLINES.get(stage, ("eval_loss", "loss")) if k in last), None)
        times = [r["wall_time_s"] for r in records if isinstance(r.get("wall_time_s"), (int, float))]
        started = (status_file or {}).get("started") or (times[0] if times else None)
        ended = (status_file or {}).get("ended") or (time.time() if state["status"] == "running" else
                                                     (times[-1] if times else mtime))
        alarms = sorted({k[len("alarm/"):] for r in records for k in r if k.startswith("alarm/")})
        return {
            "name": run_id(self.root, folder), "path": str(folder), "stage": stage,
            "model": config.get("model_name_or_path"), **state,
            "step": int(last.get("step", 0)), "max_steps": config.get("max_steps") if (config.get("max_steps") or 0) > 0
            else None, "duration_s": round(ended - started, 1) if started else None, "updated": mtime,
            "headline": {"name": headline[0], "value": headline[1]} if headline else None,
            "alarms": alarms, "has_rollouts": (folder / "rollouts.jsonl").is_file(),
            "last": {k: v for k, v in last.items() if k != "wall_time_s"},
        }

    def all(self) -> list[dict]:
        out = []
        for folder in find_runs(self.root):
            try:
                out.append(self.summary(folder))
            except OSError:  # deleted between the listing and the reading: gone from the list too
                continue
        return out

    def rollout_step(self, folder: Path, step: int | None) -> dict:
        rows = self.rollouts(folder)
        steps = sorted({r.get("step") for r in rows if isinstance(r.get("step"), int)})
        if step is None or step not in steps:
            step = steps[-1] if steps else None
        return {"steps": steps, "step": step, "rows": [r for r in rows if r.get("step") == step]}

    def config_diff(self, folders: dict[str, Path]) -> dict:
        """Every config key whose value differs between the runs (missing counts as differing)."""
        configs = {rid: self.config(f) for rid, f in folders.items()}
        keys = sorted({k for c in configs.values() for k in c})
        diff = [{"key": k, "values": {rid: c.get(k) for rid, c in configs.items()}} for k in keys
                if len({json.dumps(c.get(k), sort_keys=True) for c in configs.values()}) > 1]
        return {"configs": configs, "diff": diff}
