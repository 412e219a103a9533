"""What every benchmark script shares: each side in its own child process, timed the same way.

A side runs as `python <script> --child SIDE --spec spec.json` and writes a JSON result, so its peak
RSS is its own; the parent records the 1-minute load average around it, since other work on a
2-core machine slows a side down and says how much to trust its number (~1 is this run alone).
"""

from __future__ import annotations

import atexit
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def train_timer():
    """A transformers TrainerCallback that records when training starts and ends (`.start`, `.end`)."""
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.start = time.perf_counter()

        def on_train_end(self, args, state, control, **kw):
            self.end = time.perf_counter()

    return Timer()


def run_side(script: str, side: str, spec: dict, work: Path) -> dict:
    """Run one side as a child of `script`; its result with `process_s` and `load_avg_1m` added.
    Exits with the child's last log lines if it fails."""
    side_spec = {**spec, "out": str(work / f"out-{side}"), "result": str(work / f"result-{side}.json")}
    spec_path = work / f"spec-{side}.json"
    spec_path.write_text(json.dumps(side_spec))
    log = work / f"log-{side}.txt"
    print(f"running {side} ...", end=" ", flush=True)
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.call([sys.executable, script, "--child", side, "--spec", str(spec_path)],
                             stdout=f, stderr=subprocess.STDOUT)
    if rc != 0:
        print(f"FAILED (exit {rc}); last lines of {log}:\n" + "".join(log.read_text().splitlines(True)[-30:]))
        sys.exit(1)
    result = json.loads(Path(side_spec["result"]).read_text())
    result["process_s"] = time.perf_counter() - t0  # includes interpreter start and imports
    result["load_avg_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    return result


def pick(parser, raw: str | None, choices, default: str, what: str) -> list[str]:
    """The comma-separated names of a --sides / --workloads option, each checked against `choices`."""
    names = (raw or default).split(",")
    for name in names:
        if name not in choices:
            parser.error(f"unknown {what} {name!r}; choose from {', '.join(choices)}")
    return names


def work_dir(workdir: str | None, prefix: str) -> Path:
    """--workdir (kept), or a temporary folder removed when the script exits."""
    if workdir:
        path = Path(workdir)
        path.mkdir(parents=True, exist_ok=True)
        return path
    tmp = tempfile.TemporaryDirectory(prefix=prefix)
    atexit.register(tmp.cleanup)
    return Path(tmp.name)


def write_result(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path.relative_to(Path(__file__).resolve().parent.parent)}")
