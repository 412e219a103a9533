"""Tokenized data, made once with `datasets` and kept on disk for the next run.

Rows are read and validated first (data/sources.py, formats.py: every bad row named by file:line);
then every item is tokenized and cut (data/prepare.py `Kind`) through `datasets.Dataset.map`, in
`preprocessing_num_workers` processes, and the result is saved as Arrow under a key made of
everything the tokens depend on: the rows themselves, the tokenizer, the template's source, the
cutoff policy, the masking flags, the libraries that render and tokenize, and `TOKENIZE_VERSION`.
A second run with the same key reads the tokens back instead of tokenizing again.

An entry is written to a temp folder and renamed into place, so a killed run leaves no half entry
that a later run would trust; only the main process writes one (train/distributed.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

from posttrain.data.chat import ChatRenderer, TokenizedSample
from posttrain.data.prepare import CutoffCounter, Kind, PrepareReport, cut, tokenize_items
from posttrain.errors import DataError

log = logging.getLogger(__name__)

# Bump when the tokens posttrain makes of the same rows change (chat.py, prepare.py, pairs.py):
# entries made by the older code are then never read.
TOKENIZE_VERSION = 1
_TMP = ".tmp-"


def cache_root() -> Path:
    """posttrain's cache folder: $POSTTRAIN_CACHE, else ~/.cache/posttrain (XDG_CACHE_HOME honoured)."""
    root = os.environ.get("POSTTRAIN_CACHE")
    return Path(root) if root else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "posttrain"


def tokenized_cache_dir() -> Path:
    return cache_root() / "tokenized"


@dataclass
class TokenizeOptions:
    """How a stage tokenizes: in `num_proc` processes (None: this one), through the on-disk cache or
    not; `main` is the process that writes cache entries and logs (the others only read them)."""

    num_proc: int | None = None
    cache: bool = True
    main: bool = True
    cache_dir: Path | None = None  # default: tokenized_cache_dir()

    @classmethod
    def from_config(cls, config, main: bool = True) -> TokenizeOptions:
        return cls(config.preprocessing_num_workers, config.tokenized_cache, main)


def tokenize_rows(kind: Kind, items: list, renderer: ChatRenderer, cutoff_len: int, overlong: str,
                  options: TokenizeOptions) -> tuple[list, PrepareReport]:
    """`items` tokenized and cut as `prepare.tokenize_items` does (same samples, same order, same
    report), through `datasets` and the cache as `options` say."""
    num_proc = options.num_proc if options.num_proc and options.num_proc > 1 else None
    if not options.cache and num_proc is None:
        return tokenize_items(kind, items, renderer, cutoff_len, overlong)
    try:  # the items are dataclasses: JSON writes their fields (`vars`), at C speed, unlike dataclasses.asdict
        rows = [json.dumps(item, default=vars) for item in items]
    except (TypeError, ValueError) as err:  # e.g. a date in a parquet row's tool arguments
        log.warning("tokenizing in this process, uncached: a row holds a value JSON cannot write (%s)", err)
        return tokenize_items(kind, items, renderer, cutoff_len, overlong)
    key = cache_key(kind, rows, renderer, cutoff_len, overlong)
    path = (options.cache_dir or tokenized_cache_dir()) / key
    table = _read(path, len(rows)) if options.cache else None
    if table is None:
        table = _tokenize(kind, rows, renderer, cutoff_len, overlong, num_proc, key)
        if options.cache and options.main:
            _write(path, table, key)
        return _samples(kind, items, table, cutoff_len, overlong)
    samples, report = _samples(kind, items, table, cutoff_len, overlong)
    if options.main:
        log.info("data: %d %s from the cache at %s", len(samples), kind.what, path)
    return samples, report


# ---- the key ----------------------------------------------------------------------------------------

def cache_key(kind: Kind, rows: list[str], renderer: ChatRenderer, cutoff_len: int, overlong: str) -> str:
    import jinja2
    import tokenizers
    import transformers

    data = hashlib.sha256()
    for row in rows:
        data.update(row.encode())
        data.update(b"\n")
    parts = {
        "version": TOKENIZE_VERSION, "kind": kind.name, "rows": data.hexdigest(),
        "tokenizer": tokenizer_key(renderer.tokenizer),
        "template": renderer.template, "cutoff_len": cutoff_len, "overlong": overlong,
        "train_on_prompt": renderer.train_on_prompt, "mask_history": renderer.mask_history,
        "mask_reasoning": renderer.mask_reasoning,
        # The template is rendered by transformers' jinja environment and the text tokenized by tokenizers.
        "libraries": [transformers.__version__, tokenizers.__version__, jinja2.__version__],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def tokenizer_key(tokenizer) -> str:
    """A hash of everything the tokenizer encodes with: its whole tokenizer.json (vocabulary, merges,
    normalizer, added tokens, post-processor), its class and special tokens (the template reads them)."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    h.update(tokenizer.backend_tokenizer.to_str().encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    return h.hexdigest()


# ---- tokenizing through datasets ------------------------------------------------------------------------

def _features():
    from datasets import Features, Sequence, Value

    tokens = Sequence(Sequence(Value("int32")))  # datasets >= 4 names it List; Sequence works in 3.x too
    return Features({"ids": tokens, "labels": tokens, "source": Value("string"), "truncated": Value("bool"),
                     "dropped": Value("string"), "error": Value("string")})


def _tokenize_batch(batch: dict, kind: Kind, renderer: ChatRenderer, cutoff_len: int, overlong: str) -> dict:
    """One batch of JSON rows to columns; runs in a worker process. A row the template cannot render
    comes back as its error (what and file:line), raised in the main process in row order."""
    out = {name: [] for name in ("ids", "labels", "source", "truncated", "dropped", "error")}
    for row in batch["row"]:
        try:
            seqs, truncated, dropped = cut(kind.sequences(renderer, kind.from_dict(json.loads(row))), cutoff_len,
                                           overlong)
            error = ""
        except DataError as err:
            seqs, truncated, dropped, error = None, False, "error", json.dumps([err.problem, err.source, err.row])
        out["ids"].append([s.input_ids for s in seqs or []])
        out["labels"].append([s.labels for s in seqs or []])
        out["source"].append(seqs[0].source if seqs else "")
        out["truncated"].append(truncated)
        out["dropped"].append(dropped)
        out["error"].append(error)
    return out


def _tokenize(kind: Kind, rows: list[str], renderer: ChatRenderer, cutoff_len: int, overlong: str,
              num_proc: int | None, key: str):
    from datasets import Dataset

    num_proc = min(num_proc, len(rows)) if num_proc else None
    if num_proc:  # forked workers: the Rust tokenizer's own threads would warn and turn themselves off
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with _no_progress_bars():
        table = Dataset.from_dict({"row": rows}).map(
            _tokenize_batch, batched=True, remove_columns=["row"], features=_features(), num_proc=num_proc,
            fn_kwargs={"kind": kind, "renderer": renderer, "cutoff_len": cutoff_len, "overlong": overlong},
            new_fingerprint=key)  # datasets would otherwise hash the function's arguments, the tokenizer included
    errors = table.data.column("error").to_pylist()  # straight from Arrow: no row-by-row formatting
    first = next((i for i, e in enumerate(errors) if e), None)
    if first is not None:
        problem, source, row = json.loads(errors[first])
        raise DataError(problem, source, row)
    return table


@contextlib.contextmanager
def _no_progress_bars():
    """posttrain logs one line for its data, not datasets' bars for each map and save."""
    from datasets.utils.logging import disable_progress_bar, enable_progress_bar, is_progress_bar_enabled

    shown = is_progress_bar_enabled()
    disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            enable_progress_bar()


# ---- the entries on disk --------------------------------------------------------------------------------

def _read(path: Path, n_rows: int):
    """The entry at `path` if it is whole and has one row per item, else None (it is then made again)."""
    from datasets import Dataset

    if not (path / "posttrain.json").is_file():
        return None
    try:
        table = Dataset.load_from_disk(str(path))
    except Exception as err:  # noqa: BLE001 — a damaged entry is made again, not an error
        log.warning("ignoring the damaged tokenized-data cache entry %s (%s)", path, err)
        return None
    return table if len(table) == n_rows else None


def _write(path: Path, table, key: str) -> None:
    """Save under a temp name, then rename into place: a killed run leaves only a temp folder, which
    is never read and is removed by the next write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path.parent)
    tmp = path.parent / f"{key}{_TMP}{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with _no_progress_bars():
            table.save_to_disk(str(tmp))
        # Written last: an entry without it is not whole (datasets' own files come first).
        (tmp / "posttrain.json").write_text(json.dumps({"key": key, "version": TOKENIZE_VERSION, "rows": len(table)}))
        if (path / "posttrain.json").is_file():  # another run of the same data finished first: theirs stays
            return
        if path.exists():  # an entry that is not whole (no marker): replaced
            shutil.rmtree(path)
        os.rename(tmp, path)
    except OSError as err:  # a full disk, or another run's entry landed in between: train on, uncached
        log.warning("could not write the tokenized-data cache entry %s (%s)", path, err)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale_temps(folder: Path) -> None:
    """Temp folders of killed runs on this machine (their process is gone)."""
    host = socket.gethostname()
    for entry in folder.glob(f"*{_TMP}{host}-*"):
        pid = entry.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---- back to samples --------------------------------------------------------------------------------------

def _samples(kind: Kind, items: list, table, cutoff_len: int, overlong: str) -> tuple[list, PrepareReport]:
    """The training samples of the kept items, and the report, exactly as `tokenize_items` makes them."""
    columns = table.select_columns(["ids", "labels", "source", "truncated", "dropped"])[:]
    cutoff = CutoffCounter(cutoff_len, overlong)
    out = []
    for item, ids, labels, source, truncated, dropped in zip(items, columns["ids"], columns["labels"],
                                                             columns["source"], columns["truncated"],
                                                             columns["dropped"]):
        seqs = [TokenizedSample(i, l, source) for i, l in zip(ids, labels)]
        kept = cutoff.record(seqs, truncated, dropped)
        if kept is not None:
            out.append(kind.build(kept, item))
    return out, cutoff.finish(out, kind.what)
