"""The environment for tests that run posttrain in a child process (`python -m posttrain`, torchrun)."""

from __future__ import annotations

import os
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment with the source tree first on PYTHONPATH (whatever else is there stays:
    a machine whose packages live on PYTHONPATH must still find them) and one torch thread per child."""
    path = os.pathsep.join(filter(None, [SRC, os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **extra}
