"""Every shipped example config loads under the command its header names, with no key refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from posttrain.config import STAGES, load_config

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))


def _command(path: Path) -> str:
    """The command the example is for: its `stage:` key, else the first word after `posttrain` in its header."""
    stage = (yaml.safe_load(path.read_text()) or {}).get("stage")
    if stage:
        return stage
    header = next(line for line in path.read_text().splitlines() if "posttrain " in line)
    return header.split("posttrain ", 1)[1].split()[0]


def test_every_example_is_found():
    assert len(EXAMPLES) >= 10


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_config_loads(path):
    command = _command(path)
    assert command in STAGES, f"{path.name}: no command {command!r}"
    config = load_config(command, str(path))
    assert config.model_dump()  # validated: every key known, every value allowed
