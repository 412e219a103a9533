"""The folders posttrain writes (a stage's `output_dir`, `export`'s `export_dir`): which entries are
its own, the checks before a run writes one, and clearing only those entries.

posttrain never deletes a file it did not write. A folder is posttrain's when it holds the marker
file a run writes first (`posttrain_config.yaml`, or `posttrain_export.yaml` for an export); then
`overwrite_output_dir` replaces the entries a run writes there and nothing else. A folder that is
not empty and not posttrain's (a base model, the user's data) is refused, whatever the flags say.
"""

from __future__ import annotations

import fnmatch
import shutil
from pathlib import Path

from posttrain.errors import ConfigError

RUN_MARKER = "posttrain_config.yaml"
EXPORT_MARKER = "posttrain_export.yaml"

# Everything a run or an export writes at the top of its folder: the marker, the logs and plots,
# checkpoints and temp folders, and what transformers / PEFT `save_pretrained` write for a model,
# an adapter and a tokenizer.
# The temp folders a run writes beside its results, each named with the writing process's id
# (checkpoint._atomic_dir, run_log.write_final, adapters.save_pissa_initial); a killed run leaves them.
TEMP_ENTRIES = (".tmp-checkpoint-[0-9]*", ".tmp-final-[0-9]*", ".pissa-init-[0-9]*")
CHECKPOINT_ENTRIES = ("checkpoint-[0-9]*", *TEMP_ENTRIES)
OWN_ENTRIES = (
    RUN_MARKER, EXPORT_MARKER, "metrics.jsonl", "run_status.json", "rollouts.jsonl", "training_*.png", "runs",
    "wandb", *CHECKPOINT_ENTRIES,
    "config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
    "adapter_config.json", "README.md", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja",
    "chat_template.json",
)


def is_own(name: str, patterns: tuple[str, ...] = OWN_ENTRIES) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _same_or_inside(inner: Path, outer: Path) -> bool:
    try:
        inner, outer = inner.expanduser().resolve(), outer.expanduser().resolve()
    except (OSError, RuntimeError):  # a symlink loop: it cannot be an input we read either
        return False
    return inner == outer or outer in inner.parents


def check_output_folder(path: str, *, key: str, marker: str, overwrite: bool, resume: bool = False,
                        inputs: list[tuple[str, str | None]] = ()) -> None:
    """Refuse, before anything loads, an output folder the run could not write without harm.

    `inputs` pairs config keys with the paths the run reads (model, adapter, data): the output may not
    be one of them, nor hold one, since clearing it or saving into it would destroy what is read."""
    out = Path(path).expanduser()
    if out.is_file() or (out.exists() and not out.is_dir()):
        raise ConfigError(f"{key}: {path!r} is a file; choose a folder (it is created if missing)")
    for what, given in inputs:
        if given and _same_or_inside(Path(given), out):
            raise ConfigError(f"{key}: {path!r} holds {what} {given!r}, which this run reads; writing there "
                              f"would overwrite it: choose another {key}")
    if not out.is_dir():
        return
    try:
        entries = sorted(p.name for p in out.iterdir())
    except OSError as err:
        raise ConfigError(f"{key}: {path!r} cannot be read ({err.strerror})") from None
    if not entries:
        return
    foreign = [n for n in entries if not is_own(n)]
    # Checkpoints alone (copied or moved from another run, with a killed run's temp folders) are
    # resumed from, when asked to.
    only_checkpoints = all(is_own(n, CHECKPOINT_ENTRIES) for n in entries)
    if (marker not in entries and not (resume and only_checkpoints)) or foreign:
        shown = ", ".join(repr(n) for n in (foreign or entries)[:3])
        raise ConfigError(f"{key}: {path!r} is not empty and holds files posttrain did not write ({shown}); "
                          f"posttrain never deletes or mixes into such a folder: choose a new or empty {key}")
    if not (overwrite or resume):
        what, resumable = ("run", ", resume_from_checkpoint: auto to continue it") if marker == RUN_MARKER \
            else ("export", "")
        raise ConfigError(f"{key}: {path!r} already holds a posttrain {what}; set overwrite_output_dir: true to "
                          f"replace it{resumable}, or choose another folder")


def clear_own_entries(path: str | Path) -> None:
    """Remove what an earlier run wrote into `path`; an entry posttrain did not write stays."""
    out = Path(path)
    if not out.is_dir():
        return
    for entry in out.iterdir():
        if not is_own(entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
