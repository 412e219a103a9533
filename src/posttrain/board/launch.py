"""Launching a training run from the page (`posttrain board --allow-launch`; off by default).

A launch is the CLI run it would be by hand: the config is written to RUNS_DIR/.launch/NAME.yaml with
`output_dir: RUNS_DIR/NAME`, checked as `posttrain STAGE` would check it (a bad key is the same one-line
error, before anything starts), then `python -m posttrain STAGE NAME.yaml` runs in its own process
group, its output in RUNS_DIR/.launch/NAME.log. The board finds the run once it writes metrics.jsonl.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

from posttrain.errors import ConfigError

STAGES = ("sft", "rm", "dpo", "kto", "ppo", "grpo")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# Where the run goes and what it resumes are the board's to set, not the pasted config's.
SET_BY_BOARD = ("stage", "output_dir", "overwrite_output_dir", "resume_from_checkpoint")


class Launcher:
    def __init__(self, root: Path):
        self.root = root
        self.children: dict[str, subprocess.Popen] = {}

    def reap(self) -> None:
        """Collect finished children, so their pids stop looking alive to the status check."""
        for name, proc in list(self.children.items()):
            if proc.poll() is not None:
                del self.children[name]

    def launch(self, stage: str, name: str, config_text: str) -> dict:
        from posttrain.config import load_config

        if stage not in STAGES:
            raise ConfigError(f"stage {stage!r}: choose one of {', '.join(STAGES)}")
        if not NAME.fullmatch(name or ""):
            raise ConfigError(f"run name {name!r}: letters, digits, '.', '_' and '-' (up to 64), starting with a "
                              "letter or digit")
        target = self.root / name
        if target.exists():
            raise ConfigError(f"{target} already exists: choose another run name")
        try:
            raw = yaml.safe_load(config_text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"the config is not YAML: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError("the config must be a YAML mapping of keys to values")
        raw = {k: v for k, v in raw.items() if k not in SET_BY_BOARD}
        raw["output_dir"] = str(target)
        folder = self.root / ".launch"
        folder.mkdir(exist_ok=True)
        path = folder / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        try:
            load_config(stage, str(path))  # the command's own checks, before a process starts
        except ConfigError:
            path.unlink()
            raise
        log = folder / f"{name}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen([sys.executable, "-m", "posttrain", stage, str(path)], stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.children[name] = proc
        return {"name": name, "pid": proc.pid, "config": str(path), "log": str(log)}
