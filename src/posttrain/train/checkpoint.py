"""Atomic checkpoints and resume.

A checkpoint folder is written under a temporary name and renamed into place, so a run killed at
any moment leaves either a whole checkpoint or none; its files and folders are fsync'd around the
rename, so a power loss does not leave a renamed folder with empty files either. It holds the model
weights (safetensors), the objective's own running statistics (e.g. BCO's reward mean), the optimizer
and scheduler state, the RNG states and the data position, so a resumed run continues exactly where
the killed one stopped. Resuming with `auto` skips a newest checkpoint that is broken all the same.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import re
import shutil
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from posttrain.errors import ConfigError
from posttrain.output_folder import TEMP_ENTRIES, is_own
from posttrain.train import distributed as dist
from posttrain.train.parallel import SHARDED_FOLDERS

log = logging.getLogger(__name__)

PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
TORCH_FILES = ("optimizer.pt", "scheduler.pt", "rng.pt")
FILES = ("model.safetensors", *TORCH_FILES, STATE_FILE)


def _atomic_dir(final: Path) -> Path:
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _commit_dir(tmp: Path, final: Path) -> None:
    fsync_tree(tmp)  # the data on disk before the name: a rename that outlives a crash finds whole files
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(final.parent)  # and the rename itself


def fsync_tree(folder: Path) -> None:
    """Every file under `folder`, then each folder, flushed to disk."""
    for path in sorted(folder.rglob("*"), key=lambda p: -len(p.parts)):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        elif path.is_dir():
            fsync_dir(path)
    fsync_dir(folder)


def fsync_dir(folder: Path) -> None:
    """A folder's entries (names created, renamed or removed in it) flushed to disk. POSIX only: Windows
    cannot open a folder, and flushes its entries with the files."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_leftovers(output_dir: str | Path) -> None:
    """The temp folders killed runs left in output_dir: only names posttrain writes, and none of this
    process's own (PiSSA's initial adapter is written before the run starts training)."""
    out = Path(output_dir)
    if not out.is_dir():
        return
    for path in out.iterdir():
        if is_own(path.name, TEMP_ENTRIES) and path.is_dir() and not path.is_symlink() \
                and not path.name.endswith(f"-{os.getpid()}"):
            log.info("removing %s, left behind by a run that was stopped", path)
            shutil.rmtree(path, ignore_errors=True)


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Every checkpoint folder in output_dir, oldest first, whole or not (`checkpoint_problem` tells)."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [p for p in out.iterdir() if p.is_dir() and re.fullmatch(rf"{PREFIX}\d+", p.name)]
    return sorted(found, key=_step)


def _step(checkpoint: Path) -> int:
    return int(checkpoint.name[len(PREFIX):])


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint at `path` cannot be resumed from (a file missing, cut short or unreadable), or
    None. Reads headers only: a truncated safetensors file no longer covers its header's offsets, and
    a truncated torch file (a zip archive) has lost its directory, which is at the end."""
    # A sharded run's weights and optimizer are in each rank's shards (train/parallel.py), not in these files.
    sharded = [path / k for k in SHARDED_FOLDERS if (path / k).is_dir()]
    if sharded and not any(sharded[0].rglob("*")):
        return f"{sharded[0].name}/ is empty"
    unsharded = ("model.safetensors", "optimizer.pt")
    for name in FILES:
        if not (path / name).is_file() and not (sharded and name in unsharded):
            return f"{name} is missing"
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"{STATE_FILE} is not valid JSON ({err})"
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or "python_rng" not in state:
        return f"{STATE_FILE} has no step or RNG state"
    try:
        if not sharded:
            with safe_open(path / "model.safetensors", framework="pt"):
                pass
    except (OSError, SafetensorError) as err:
        return f"model.safetensors is unreadable ({err})"
    for name in TORCH_FILES:
        if sharded and name in unsharded:
            continue
        try:
            zipfile.ZipFile(path / name).close()
        except (OSError, zipfile.BadZipFile) as err:
            return f"{name} is cut short or unreadable ({err})"
    return None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def temp_checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    """The temporary folder checkpoint `step` is written into before it is renamed into place (rank 0
    makes it; under DeepSpeed every rank writes its partitions there first)."""
    return _atomic_dir(Path(output_dir) / f"{PREFIX}{step}")


def save_checkpoint(output_dir: str | Path, step: int, *, model_state: dict[str, torch.Tensor] | None,
                    optimizer_state: dict | None, scheduler, trainer_state: dict, keep: int | None,
                    tmp: Path | None = None) -> Path:
    """Checkpoint `step` written whole or not at all. `model_state` and `optimizer_state` None: they are in
    each rank's shards, already written into `tmp` by every rank."""
    final = Path(output_dir) / f"{PREFIX}{step}"
    tmp = tmp or _atomic_dir(final)
    # Tied weights share storage; safetensors wants each tensor once and contiguous.
    if model_state is not None:
        save_file({k: v.detach().contiguous().clone() for k, v in model_state.items()}, tmp / "model.safetensors")
    if optimizer_state is not None:
        torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    state = dict(trainer_state, step=step, python_rng=_py_rng_to_json(random.getstate()))
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
    _commit_dir(tmp, final)
    if keep:
        # Only older ones make way: those above `step` are a stopped run's, replaced as this run reaches them,
        # and one of them broken must not push out the checkpoints this run can resume from.
        older = [p for p in list_checkpoints(output_dir) if _step(p) < step]
        for old in older[:max(0, len(older) - (keep - 1))]:
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
        return _newest_whole(output_dir)
    path = Path(resume)
    if not path.is_dir() or not any((path / name).exists() for name in FILES):
        raise ConfigError(f"resume_from_checkpoint: {resume!r} is not a checkpoint folder (it holds none of "
                          f"{', '.join(FILES)}); name a {PREFIX}N folder or use auto")
    problem = checkpoint_problem(path)
    if problem:
        raise ConfigError(f"resume_from_checkpoint: {resume!r} is not a whole checkpoint: {problem}; name an "
                          "older checkpoint, or use resume_from_checkpoint: auto (the newest whole one)")
    return path


def _newest_whole(output_dir: str | Path) -> Path | None:
    """The newest checkpoint in output_dir that can be resumed from; each newer, broken one is skipped with
    a warning that says why."""
    found = list_checkpoints(output_dir)
    for path in reversed(found):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        log.warning("resume_from_checkpoint: auto skips %s: %s; trying an older checkpoint", path, problem)
    if found:
        log.warning("resume_from_checkpoint: auto found no whole checkpoint in %s; training from the start",
                    output_dir)
    return None


def own_buffers(module) -> dict[str, torch.Tensor]:
    """The persistent buffers a module holds itself, not through a submodule: for an objective, its
    running statistics (BCO's reward sum and count), which no model file saves."""
    return {k: b for k, b in module.named_buffers(recurse=False) if k not in module._non_persistent_buffers_set}


def load_checkpoint(path: Path, *, model, optimizer, scheduler, device: torch.device, parallel=None,
                    module=None) -> dict:
    """Restore a checkpoint into `model` (the objective), its optimizer and scheduler, and the RNGs;
    the checkpoint's trainer state. With `parallel` (train/parallel.py) and the wrapped `module`, a sharded
    checkpoint's weights and optimizer load from its shards."""
    try:  # `checkpoint_problem` reads headers only; damage inside a file shows here
        state = json.loads((path / STATE_FILE).read_text())
        weights = load_file(path / "model.safetensors", device=str(device)) \
            if (path / "model.safetensors").is_file() else None
        optimizer_state = torch.load(path / "optimizer.pt", map_location=device, weights_only=True) \
            if (path / "optimizer.pt").is_file() else None
        scheduler_state = torch.load(path / "scheduler.pt", weights_only=True)
        rng = torch.load(path / "rng.pt", weights_only=True)
    except (OSError, EOFError, ValueError, RuntimeError, pickle.UnpicklingError, SafetensorError) as err:
        raise ConfigError(f"{path}: checkpoint is unreadable ({err}); resume from an older one") from None
    if weights is not None:  # else they come with the shards, below
        missing, unexpected = model.load_state_dict(weights, strict=False)
        # Checkpoints hold the trainable parameters and the objective's statistics; every one must come back.
        required = {k for k, p in model.named_parameters() if p.requires_grad} | set(own_buffers(model))
        missing = [k for k in missing if k in required and k not in _tied_keys(model)]
        if unexpected or missing:
            raise ConfigError(f"{path}: checkpoint does not match the model (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
    if parallel is not None and module is not None:
        parallel.load_optimizer_state(module, optimizer, optimizer_state, path)
    elif hasattr(optimizer, "load_from"):  # several optimizers that load themselves (RL's actor and critic)
        optimizer.load_from(optimizer_state, path)
    else:
        optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(scheduler_state)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    version, internal, gauss = state.pop("python_rng")
    random.setstate((version, tuple(internal), gauss))
    return state


def _tied_keys(model) -> set[str]:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return set(tied) if not isinstance(tied, dict) else set(tied.keys())
