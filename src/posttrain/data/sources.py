"""Read local data files into raw rows (plain dicts), each tagged with its file and row number.

Supported: `.jsonl` / `.ndjson`, `.json`, `.parquet`, `.csv`, a folder written by
`datasets.Dataset.save_to_disk` (or `DatasetDict.save_to_disk`: the "train" split is read), and a
plain folder of those (read recursively, in sorted path order; hidden files and files of other
types, such as README.md, are ignored). Nothing here touches the network: a Hub id is not a path.

Row numbers (`RawRow.row`, `BadRow.row`) are 1-based and mean what a user can find in the file:
  JSONL          the line number (blank lines are skipped but still counted)
  JSON           the element's index in the top-level list
  CSV            the line where the record starts; the header is line 1, so the first data row is
                 2 (the same number an editor or a spreadsheet shows)
  Parquet        the row index
  save_to_disk   the row index

Two kinds of errors:
- a problem with the whole input (the path does not exist, an unsupported file type, a folder
  with no data files) raises `DataError` as soon as `read_rows` is called; one found while
  reading (a .json file that does not parse, an empty file, an unreadable Parquet file) raises
  when the iteration reaches that file. These cannot be skipped.
- a problem with one row (a malformed JSONL line, invalid UTF-8 on a line, a row that is not an
  object) is yielded as a `BadRow` in place of a `RawRow`, so the caller decides: raise
  `bad.error()`, or count it and go on (`on_bad_rows: skip`).
"""

from __future__ import annotations

import csv
import json
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from posttrain.errors import DataError

SUPPORTED = (".jsonl", ".ndjson", ".json", ".parquet", ".csv")
_BOM = b"\xef\xbb\xbf"
# CSV cells decoded with errors="surrogateescape" carry each invalid byte as one of these.
_BAD_BYTE = re.compile("[\udc80-\udcff]")
# Long conversations easily pass csv's default 128 KiB cell limit.
csv.field_size_limit(2**31 - 1)


@dataclass
class RawRow:
    data: dict[str, Any]  # the row as a dict
    source: str  # the file it came from (the path as given, joined with the path inside a folder)
    row: int  # 1-based line / row number, see the module docstring


@dataclass
class BadRow:
    """A row that could not be read; yielded instead of raising so the caller may skip it."""

    source: str
    row: int
    problem: str

    def error(self) -> DataError:
        return DataError(self.problem, self.source, self.row)


def read_rows(path: str) -> Iterator[RawRow | BadRow]:
    """Yield every row of a file or folder, in order; see the module docstring for errors."""
    local = os.path.expanduser(path)
    if not os.path.exists(local):
        raise DataError(f"path does not exist{_hub_hint(path)}", path)
    if os.path.isdir(local):
        entries = _folder_entries(path, local)
        if not entries:
            raise DataError(
                f"folder has no data files ({', '.join(SUPPORTED)}) and is not a "
                "datasets save_to_disk folder", path)
        return _chain(entries)
    _check_extension(path)
    return _read_file(path, local)


def _hub_hint(path: str) -> str:
    if re.fullmatch(r"[\w.-]+/[\w.-]+", path) and not os.path.splitext(path)[1]:
        return (" (if this is a Hub dataset id: posttrain reads local files only, so download "
                "it first, "
                "e.g. `hf download --repo-type dataset " + path + " --local-dir data/`, "
                "and give the local folder)")
    return ""


def _extension(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def _check_extension(path: str) -> None:
    if _extension(path) not in SUPPORTED:
        raise DataError(
            f"unsupported file type {_extension(path) or '(no extension)'!r}; supported: "
            f"{', '.join(SUPPORTED)}, or a folder (of those files, or from save_to_disk)", path)


def _is_saved_dataset(local: str) -> bool:
    # Dataset.save_to_disk writes state.json (+ dataset_info.json); DatasetDict writes dataset_dict.json.
    return any(os.path.isfile(os.path.join(local, f)) for f in ("state.json", "dataset_dict.json"))


def _folder_entries(source: str, local: str, seen: frozenset[str] = frozenset()) -> list[tuple[str, str]]:
    """(source, local path) of each data file or saved dataset under a folder, sorted by path."""
    if _is_saved_dataset(local):
        return [(source, local)]
    real = os.path.realpath(local)
    if real in seen:  # a symbolic link back up the tree would be read forever
        raise DataError("is a symbolic link to a folder that contains it (a loop); remove the link", source)
    found = []
    for name in os.listdir(local):
        if name.startswith("."):  # .git, .cache/huggingface, .DS_Store
            continue
        sub_source, sub_local = os.path.join(source, name), os.path.join(local, name)
        if os.path.islink(sub_local) and not os.path.exists(sub_local):
            raise DataError(f"is a broken symbolic link (to {os.readlink(sub_local)!r}, which does not exist); "
                            "remove it or fix its target", sub_source)
        if os.path.isdir(sub_local):
            found.extend(_folder_entries(sub_source, sub_local, seen | {real}))
        elif _extension(name) in SUPPORTED:
            found.append((sub_source, sub_local))
    return sorted(found)


def _chain(entries: list[tuple[str, str]]) -> Iterator[RawRow | BadRow]:
    for source, local in entries:
        yield from _read_file(source, local)


def _read_file(source: str, local: str) -> Iterator[RawRow | BadRow]:
    try:
        yield from _read_by_type(source, local)
    except OSError as err:  # unreadable: permissions, a file removed while reading, a device error
        raise DataError(f"cannot be read: {err.strerror or err}", source) from None


def _read_by_type(source: str, local: str) -> Iterator[RawRow | BadRow]:
    if os.path.isdir(local):
        return _read_saved(source, local)
    ext = _extension(local)
    if ext in (".jsonl", ".ndjson"):
        return _read_jsonl(source, local)
    if ext == ".json":
        return _read_json(source, local)
    if ext == ".csv":
        return _read_csv(source, local)
    return _read_parquet(source, local)


class JSONProblem(ValueError):
    """Valid JSON that Python would read wrongly or crash on."""


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = {}
    for key, value in pairs:
        if key in out:
            raise JSONProblem(f"key {key!r} appears twice in one object (JSON readers keep one silently); keep one")
        out[key] = value
    return out


def parse_json(text: str) -> Any:
    """`json.loads`, refusing duplicate keys, nesting deeper than Python's stack and integers longer
    than its digit limit as `JSONProblem` (a `json.JSONDecodeError` for text that is not JSON)."""
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except RecursionError:
        raise JSONProblem("nested too deeply to read (more than ~1000 levels of lists or objects)") from None
    except json.JSONDecodeError:
        raise
    except JSONProblem:
        raise
    except ValueError:  # int(): "Exceeds the limit (4300 digits) for integer string conversion"
        raise JSONProblem(f"a number has more than {sys.get_int_max_str_digits()} digits, more than Python "
                          "reads; write it as a string") from None


def type_name(value: Any) -> str:
    """How an error names a JSON value's type: 'a string', 'a list', 'null'..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _read_jsonl(source: str, local: str) -> Iterator[RawRow | BadRow]:
    rows = 0
    # Binary, so that one line of bad bytes is one bad row rather than a crash of the whole file.
    with open(local, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM):]
            if not raw.strip():
                continue
            rows += 1
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield BadRow(source, lineno, f"invalid UTF-8 (byte 0x{raw[e.start]:02x} at byte "
                                             f"{e.start + 1} of the line); save the file as UTF-8")
                continue
            try:
                data = parse_json(text)
            except json.JSONDecodeError as e:
                yield BadRow(source, lineno, f"invalid JSON: {e.msg} at column {e.colno}")
                continue
            except JSONProblem as e:
                yield BadRow(source, lineno, str(e))
                continue
            if isinstance(data, dict):
                yield RawRow(data, source, lineno)
            else:
                yield BadRow(source, lineno, f"expected a JSON object, got {type_name(data)}")
    if rows == 0:
        raise DataError("file has no rows", source)


def _read_json(source: str, local: str) -> Iterator[RawRow | BadRow]:
    with open(local, "rb") as f:
        raw = f.read()
    if raw.startswith(_BOM):
        raw = raw[len(_BOM):]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"invalid UTF-8 (byte 0x{raw[e.start]:02x}); save the file as UTF-8",
                        source, line) from None
    try:
        doc = parse_json(text)
    except JSONProblem as e:
        raise DataError(str(e), source) from None
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and text.lstrip().startswith("{"):
            # One object per line under a .json name (common on the Hub): read it as JSON Lines.
            yield from _read_jsonl(source, local)
            return
        raise DataError(f"invalid JSON: {e.msg} at column {e.colno}", source, e.lineno) from None
    items = _json_rows(doc, source)
    if not items:
        raise DataError("file has no rows", source)
    for i, item in enumerate(items, 1):
        if isinstance(item, dict):
            yield RawRow(item, source, i)
        else:
            yield BadRow(source, i, f"element {i} is {type_name(item)}, expected a JSON object")


def _json_rows(doc: Any, source: str) -> list[Any]:
    if isinstance(doc, list):
        return doc
    if isinstance(doc, dict):
        lists = [k for k, v in doc.items() if isinstance(v, list)]
        # {"messages": [...]} is one conversation, not a list of rows.
        if len(lists) == 1 and lists[0] not in ("messages", "conversations"):
            return doc[lists[0]]
        raise DataError(
            'expected a list of rows, or an object holding one list of rows such as {"data": [...]}; '
            f"got an object with keys {sorted(doc)}", source)
    raise DataError(f"expected a list of rows, got {type_name(doc)}", source)


def _read_csv(source: str, local: str) -> Iterator[RawRow | BadRow]:
    # surrogateescape keeps bad bytes visible per cell, so only rows holding them are bad.
    with open(local, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            if header is None:
                raise DataError("file is empty", source)
            if any(_BAD_BYTE.search(h) for h in header):
                raise DataError("invalid UTF-8 in the header; save the file as UTF-8", source, 1)
            rows, start = 0, reader.line_num + 1
            for cells in reader:
                row, start = start, reader.line_num + 1
                if not cells:  # a blank line
                    continue
                rows += 1
                if any(_BAD_BYTE.search(c) for c in cells):
                    yield BadRow(source, row, "invalid UTF-8; save the file as UTF-8")
                elif len(cells) != len(header):
                    yield BadRow(source, row, f"has {len(cells)} cells but the header has "
                                              f"{len(header)} columns")
                else:
                    yield RawRow({h: _csv_cell(c) for h, c in zip(header, cells)}, source, row)
        except csv.Error as e:
            raise DataError(f"cannot parse CSV: {e}", source, reader.line_num) from None
    if rows == 0:
        raise DataError("file has a header but no rows", source)


def _csv_cell(cell: str) -> Any:
    """A cell holding a JSON list or object (a message list, tools) becomes that value."""
    if cell[:1] in ("[", "{"):
        try:
            return parse_json(cell)
        except ValueError:
            pass  # text that merely starts with a bracket, such as "[INST] ..."
    return cell


def _read_parquet(source: str, local: str) -> Iterator[RawRow | BadRow]:
    import pyarrow.parquet as pq  # imported here: only Parquet users pay for it

    try:
        pf = pq.ParquetFile(local)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"cannot read as Parquet: {e}", source) from None
    if pf.metadata.num_rows == 0:
        raise DataError("file has no rows", source)
    i = 0
    for batch in pf.iter_batches(batch_size=1024):
        for data in batch.to_pylist():
            i += 1
            yield RawRow(data, source, i)


def _read_saved(source: str, local: str) -> Iterator[RawRow | BadRow]:
    import datasets  # imported here: slow to import, and only save_to_disk folders need it

    try:
        ds = datasets.load_from_disk(local)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot load this save_to_disk folder: {e}", source) from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"is a DatasetDict with splits {sorted(ds)} and no 'train' split; give "
                            "the path of one split's folder instead", source)
        ds = ds["train"]
    if len(ds) == 0:
        raise DataError("dataset has no rows", source)
    i = 0
    # Arrow batches: much faster than datasets' row-by-row Python formatting.
    for table in ds.with_format("arrow").iter(batch_size=1024):
        for data in table.to_pylist():
            i += 1
            yield RawRow(data, source, i)
