"""Atomic checkpoints and resume.

A checkpoint folder is written under a temporary name and renamed into place, so a run killed at
any moment leaves either a whole checkpoint or none. It holds the model weights (safetensors), the
objective's own running statistics (e.g. BCO's reward mean), the optimizer and scheduler state, the
RNG states and the data position, so a resumed run continues exactly where the killed one stopped.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from posttrain.errors import ConfigError
from posttrain.train import distributed as dist

PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"


def _atomic_dir(final: Path) -> Path:
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _commit_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [p for p in out.iterdir() if p.is_dir() and re.fullmatch(rf"{PREFIX}\d+", p.name)
             and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save_checkpoint(output_dir: str | Path, step: int, *, model_state: dict[str, torch.Tensor],
                    optimizer, scheduler, trainer_state: dict, keep: int | None) -> Path:
    final = Path(output_dir) / f"{PREFIX}{step}"
    tmp = _atomic_dir(final)
    # Tied weights share storage; safetensors wants each tensor once and contiguous.
    save_file({k: v.detach().contiguous().clone() for k, v in model_state.items()}, tmp / "model.safetensors")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    state = dict(trainer_state, step=step, python_rng=_py_rng_to_json(random.getstate()))
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
    _commit_dir(tmp, final)
    if keep:
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _py_rng_to_json(state):
    version, internal, gauss = state
    return [version, list(internal), gauss]


def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """The checkpoint `resume` names ("auto": the newest in output_dir), or None. Rank 0 looks and every rank
    gets its answer, so all ranks load the same checkpoint even while rank 0 is still writing newer ones."""
    found = _find_checkpoint(resume, output_dir) if dist.is_main() else None
    return dist.broadcast_object(found)


def _find_checkpoint(resume: str | None, output_dir: str | Path) -> Path | None:
    if not resume:
        return None
    if resume == "auto":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise ConfigError(f"resume_from_checkpoint: {resume!r} is not a checkpoint folder (no {STATE_FILE})")
    return path


def own_buffers(module) -> dict[str, torch.Tensor]:
    """The persistent buffers a module holds itself, not through a submodule: for an objective, its
    running statistics (BCO's reward sum and count), which no model file saves."""
    return {k: b for k, b in module.named_buffers(recurse=False) if k not in module._non_persistent_buffers_set}


def load_checkpoint(path: Path, *, model, optimizer, scheduler, device: torch.device) -> dict:
    state = json.loads((path / STATE_FILE).read_text())
    weights = load_file(path / "model.safetensors", device=str(device))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # Checkpoints hold the trainable parameters and the objective's statistics; every one must come back.
    required = {k for k, p in model.named_parameters() if p.requires_grad} | set(own_buffers(model))
    missing = [k for k in missing if k in required and k not in _tied_keys(model)]
    if unexpected or missing:
        raise ConfigError(f"{path}: checkpoint does not match the model (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]})")
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device, weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    version, internal, gauss = state.pop("python_rng")
    random.setstate((version, tuple(internal), gauss))
    return state


def _tied_keys(model) -> set[str]:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return set(tied) if not isinstance(tied, dict) else set(tied.keys())
