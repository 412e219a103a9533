"""The bench scripts time the training loop by wrapping a few posttrain functions in their child
processes; a refactor that moves one of them would break every benchmark silently (CI installs no
TRL, so the benches never run there). Each name a bench script wraps must still exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


POSTTRAIN_OWNERS = ("Trainer", "RunRecorder", "Parallel", "rl_trainer", "sft_mod")


def _wrapped(script: Path) -> set[str]:
    """Attributes a script assigns to on posttrain objects: `Trainer.train, RunRecorder.finish = ...`."""
    names = set()
    for line in script.read_text().splitlines():
        m = re.match(r"\s+((?:[\w.]+\.\w+\s*,\s*)*[\w.]+\.\w+)\s*=\s*\w", line)
        if m:
            names.update(n.strip() for n in m.group(1).split(",") if n.strip().split(".")[0] in POSTTRAIN_OWNERS)
    return names


@pytest.mark.parametrize("script", ["sft.py", "dpo.py", "grpo.py", "scale.py"])
def test_every_function_a_bench_wraps_still_exists(script):
    import posttrain.train.rl.trainer as rl_trainer
    import posttrain.train.sft as sft_mod
    from posttrain.train.loop import Trainer
    from posttrain.train.parallel import Parallel
    from posttrain.train.run_log import RunRecorder

    scope = {"Trainer": Trainer, "RunRecorder": RunRecorder, "Parallel": Parallel, "rl_trainer": rl_trainer,
             "sft_mod": sft_mod}
    wrapped = _wrapped(BENCH / script)
    assert wrapped, f"{script}: found no wrapped names (has its timing changed?)"
    for name in wrapped:
        owner, attr = name.rsplit(".", 1)
        obj = scope[owner.split(".")[0]]
        for part in owner.split(".")[1:]:
            obj = getattr(obj, part)
        assert hasattr(obj, attr), f"bench/{script} wraps {name}, which no longer exists"
