"""What every benchmark script shares: each side in its own child process, timed the same way.

A side runs as `python <script> --child SIDE --spec spec.json` (or under a launcher such as torchrun,
one process per rank) and writes a JSON result, so its peak RSS is its own; the parent records the
1-minute load average around it, since other work on a 2-core machine slows a side down and says how
much to trust its number (~1 is this run alone).
"""

from __future__ import annotations

import atexit
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def train_timer():
    """A transformers TrainerCallback that records when training starts and ends (`.start`, `.end`) and
    the peak RSS at the end of training, before anything is saved (`.peak_rss_mib`)."""
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.start = time.perf_counter()

        def on_train_end(self, args, state, control, **kw):
            self.end = time.perf_counter()
            self.peak_rss_mib = peak_rss_mib()

    return Timer()


def run_side(script: str, side: str, spec: dict, work: Path, *, launcher: list[str] | None = None,
             env: dict | None = None, rss_limit_mib: float | None = None, must_pass: bool = True) -> dict:
    """Run one side as a child of `script` (started by `launcher`, default this Python; e.g. torchrun's
    command for one process per rank); its result with `process_s` and `load_avg_1m` added. A child
    that writes one result per rank (`result-SIDE.rankN.json`) gives {"ranks": [...]} in rank order.

    With `rss_limit_mib`, the run is stopped as soon as any of its processes holds more resident memory
    than that: {"over_limit_mib": the RSS seen}. A failed run exits with the child's last log lines,
    or, unless `must_pass`, gives {"failed": "exit N"}."""
    side_spec = {**spec, "out": str(work / f"out-{side}"), "result": str(work / f"result-{side}.json")}
    spec_path = work / f"spec-{side}.json"
    spec_path.write_text(json.dumps(side_spec))
    log = work / f"log-{side}.txt"
    print(f"running {side} ...", end=" ", flush=True)
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    command = [*(launcher or [sys.executable]), script, "--child", side, "--spec", str(spec_path)]
    with open(log, "w") as f:
        # Its own process group, so a run stopped over the limit takes every rank (and the launcher) with it.
        proc = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            over = _wait(proc, rss_limit_mib)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    rc = proc.returncode
    timing = {"process_s": time.perf_counter() - t0,  # includes interpreter start and imports
              "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
    if over is not None:
        print(f"stopped: a process passed {rss_limit_mib:.0f} MiB ({over:.0f} MiB)")
        return {"over_limit_mib": over, **timing}
    if rc != 0:
        print(f"FAILED (exit {rc}); last lines of {log}:\n" + "".join(log.read_text().splitlines(True)[-30:]))
        if must_pass:
            sys.exit(1)
        return {"failed": f"exit {rc}", **timing}
    result_path = Path(side_spec["result"])
    if result_path.exists():
        result = json.loads(result_path.read_text())
    else:
        ranks = sorted(work.glob(f"result-{side}.rank*.json"), key=lambda p: int(p.stem.rsplit("rank", 1)[1]))
        result = {"ranks": [json.loads(p.read_text()) for p in ranks]}
    return {**result, **timing}


def _wait(proc: subprocess.Popen, rss_limit_mib: float | None) -> float | None:
    """Wait for `proc`; with a limit, poll its process tree's RSS and stop it when one process passes the
    limit (returns that RSS in MiB; None when it ended by itself)."""
    if rss_limit_mib is None:
        proc.wait()
        return None
    while proc.poll() is None:
        worst = max((_rss_mib(pid) for pid in _tree(proc.pid)), default=0.0)
        if worst > rss_limit_mib:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return worst
        time.sleep(0.2)
    return None


def _tree(pid: int) -> list[int]:
    """`pid` and its descendants (a process that ends meanwhile is skipped)."""
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split()]
        except OSError:
            pass
    return pids


def _rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return 0.0


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
