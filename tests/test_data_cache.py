"""The tokenized-data cache (data/cache.py): the same samples and report as tokenizing in process,
in worker processes too; a rerun reads the cache; anything the tokens depend on makes a new entry;
a killed write is never trusted; a row the template cannot render is still named by file:line."""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
import textwrap

import pytest

from child_env import child_env
from posttrain.config import load_config
from posttrain.data.cache import TokenizeOptions, tokenize_rows
from posttrain.data.chat import BUILTIN_TEMPLATES_DIR, ChatRenderer
from posttrain.data.formats import DatasetSpec, load_conversations
from posttrain.data.pairs import PAIRS, UNPAIRED, response_renderer, unpaired_items
from posttrain.data.prepare import SFT, tokenize_items
from posttrain.data.stage_samples import load_pair_samples, load_sft_samples, load_unpaired_samples
from posttrain.data.preference_formats import load_preferences, load_unpaired
from posttrain.data.synthetic import preference_pairs, task_examples
from posttrain.errors import DataError

LONG = "1 " * 30  # over the cutoff below: cut, or dropped under overlong=drop


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def chat_rows(n=10, seed=0):
    rows = [{"messages": r["messages"]} for r in task_examples(n, seed)]
    rows.append({"messages": [{"role": "user", "content": "reverse 12"}, {"role": "assistant", "content": LONG}]})
    rows.append({"messages": [{"role": "user", "content": LONG}, {"role": "assistant", "content": "21"}]})
    return rows


def pair_rows(n=8):
    rows = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}
            for r in preference_pairs(task_examples(n, 0), seed=0)]
    return rows + [{"prompt": "reverse 12", "chosen": LONG, "rejected": "12"}]


def conversations(tmp_path, rows=None, name="chat.jsonl"):
    return load_conversations([DatasetSpec(path=write(tmp_path / name, rows or chat_rows()))])[0]


def items(kind, tmp_path, tokenizer):
    """(items, renderer) of each kind, from tiny data with rows to cut and to drop."""
    if kind is SFT:
        return conversations(tmp_path), ChatRenderer(tokenizer, None)
    path = write(tmp_path / "pairs.jsonl", pair_rows())
    if kind is PAIRS:
        return load_preferences([DatasetSpec(path=path)])[0], response_renderer(tokenizer, None)
    labelled = [{"prompt": r["prompt"], "completion": r[key], "label": key == "chosen"}
                for r in pair_rows() for key in ("chosen", "rejected")]
    rows = load_unpaired([DatasetSpec(path=write(tmp_path / "kto.jsonl", labelled))])[0]
    return unpaired_items(rows), response_renderer(tokenizer, None)


def counting(kind):
    """`kind` that counts the items it tokenizes (the same name: the same cache key)."""
    calls = []

    def sequences(renderer, item):
        calls.append(item)
        return kind.sequences(renderer, item)

    return dataclasses.replace(kind, sequences=sequences), calls


@pytest.mark.parametrize("kind, overlong", [(SFT, "truncate"), (SFT, "drop"), (PAIRS, "drop"), (UNPAIRED, "truncate")],
                         ids=["sft", "sft-drop", "pairs-drop", "kto"])
def test_cached_and_parallel_tokenizing_give_the_same_samples_and_report(tmp_path, tiny_tokenizer, kind, overlong):
    rows, renderer = items(kind, tmp_path, tiny_tokenizer)
    expected, report = tokenize_items(kind, rows, renderer, 24, overlong)
    assert report.truncated + report.dropped_overlong + report.dropped_untrained >= 1  # the cut is exercised
    runs = {"cold": TokenizeOptions(cache_dir=tmp_path / "cache"),
            "cached": TokenizeOptions(cache_dir=tmp_path / "cache"),
            "num_proc=2": TokenizeOptions(num_proc=2, cache=False),
            "num_proc=2 cached": TokenizeOptions(num_proc=2, cache_dir=tmp_path / "cache2")}
    for name, options in runs.items():
        got, got_report = tokenize_rows(kind, rows, renderer, 24, overlong, options)
        assert got == expected, name
        assert got_report == report, name


def test_a_second_run_reads_the_cache_and_any_change_to_its_key_tokenizes_again(tmp_path, tiny_tokenizer, caplog):
    convs = conversations(tmp_path)
    renderer = ChatRenderer(tiny_tokenizer, None)
    options = TokenizeOptions(cache_dir=tmp_path / "cache")
    kind, calls = counting(SFT)
    first, _ = tokenize_rows(kind, convs, renderer, 24, "truncate", options)
    assert len(calls) == len(convs)

    calls.clear()
    with caplog.at_level(logging.INFO, logger="posttrain.data.cache"):
        again, _ = tokenize_rows(kind, convs, renderer, 24, "truncate", options)
    assert calls == [] and again == first
    entry = next((tmp_path / "cache").iterdir())
    assert f"data: {len(first)} samples from the cache at {entry}" in caplog.text

    template = tmp_path / "chatml_v2.jinja"  # the same template with one more comment: another source
    template.write_text((BUILTIN_TEMPLATES_DIR / "chatml.jinja").read_text() + "{#- v2 #}")
    changed_row = chat_rows()
    changed_row[0]["messages"][1]["content"] += "0"
    changes = {"template": (convs, ChatRenderer(tiny_tokenizer, str(template)), 24),
               "cutoff_len": (convs, renderer, 25),
               "mask_history": (convs, ChatRenderer(tiny_tokenizer, None, mask_history=True), 24),
               "data": (conversations(tmp_path, changed_row, "changed.jsonl"), renderer, 24)}
    for name, (rows, changed_renderer, cutoff_len) in changes.items():
        calls.clear()
        tokenize_rows(kind, rows, changed_renderer, cutoff_len, "truncate", options)
        assert len(calls) == len(rows), name
    assert len(list((tmp_path / "cache").iterdir())) == 1 + len(changes)


KILLED_WRITE = """
import os, signal, sys
from pathlib import Path
from datasets import Dataset
from posttrain.data.cache import TokenizeOptions, tokenize_rows
from posttrain.data.chat import ChatRenderer
from posttrain.data.formats import DatasetSpec, load_conversations
from posttrain.data.prepare import SFT
from posttrain.model.loading import load_tokenizer

save = Dataset.save_to_disk

def save_then_die(self, path, **kwargs):  # the Arrow files are written, the entry is not yet in place
    save(self, path, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)

Dataset.save_to_disk = save_then_die
model, data, cache = sys.argv[1:]
convs = load_conversations([DatasetSpec(path=data)])[0]
renderer = ChatRenderer(load_tokenizer(model), None)
tokenize_rows(SFT, convs, renderer, 24, "truncate", TokenizeOptions(cache_dir=Path(cache)))
"""


def test_a_run_killed_while_writing_leaves_no_entry_a_later_run_trusts(tmp_path, tiny_model_dir, tiny_tokenizer):
    data, cache = write(tmp_path / "chat.jsonl", chat_rows()), tmp_path / "cache"
    child = subprocess.run([sys.executable, "-c", textwrap.dedent(KILLED_WRITE), str(tiny_model_dir), data, str(cache)],
                           env=child_env(), capture_output=True, text=True, timeout=120)
    assert child.returncode == -9, child.stderr
    (leftover,) = cache.iterdir()
    assert (leftover / "dataset_info.json").is_file()  # half an entry: datasets' files, not posttrain's marker

    convs = conversations(tmp_path)
    renderer = ChatRenderer(tiny_tokenizer, None)
    kind, calls = counting(SFT)
    got, report = tokenize_rows(kind, convs, renderer, 24, "truncate", TokenizeOptions(cache_dir=cache))
    assert len(calls) == len(convs)
    assert (got, report) == tokenize_items(SFT, convs, renderer, 24, "truncate")
    (entry,) = cache.iterdir()  # the dead run's temp folder is gone, the new entry in place
    assert entry != leftover and (entry / "posttrain.json").is_file()

    (entry / "posttrain.json").unlink()  # an entry without its marker (a copy cut short) is not whole
    calls.clear()
    assert tokenize_rows(kind, convs, renderer, 24, "truncate", TokenizeOptions(cache_dir=cache))[0] == got
    assert len(calls) == len(convs) and (entry / "posttrain.json").is_file()


def test_a_row_the_template_cannot_render_is_named_by_file_line_in_worker_processes(tmp_path, tiny_tokenizer):
    template = tmp_path / "no_boom.jinja"
    template.write_text("{%- for m in messages %}{%- if 'boom' in m['content'] %}"
                        "{{ raise_exception('cannot say boom') }}{%- endif %}{%- endfor %}"
                        + (BUILTIN_TEMPLATES_DIR / "chatml.jinja").read_text())
    rows = chat_rows(6)
    rows[4]["messages"][0]["content"] = "boom"
    convs = conversations(tmp_path, rows)
    renderer = ChatRenderer(tiny_tokenizer, str(template))
    with pytest.raises(DataError) as in_process:
        tokenize_items(SFT, convs, renderer, 24)
    assert "chat.jsonl:5: chat template failed to render this row: cannot say boom" in str(in_process.value)
    for options in (TokenizeOptions(num_proc=2, cache=False), TokenizeOptions(num_proc=2, cache_dir=tmp_path / "c")):
        with pytest.raises(DataError) as workers:
            tokenize_rows(SFT, convs, renderer, 24, "truncate", options)
        assert str(workers.value) == str(in_process.value)
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())  # nothing cached of a failed run


def stage_config(name, tmp_path, model_dir, data, *overrides):
    return load_config(name, None, [f"model_name_or_path={model_dir}", f"output_dir={tmp_path / 'out'}",
                                    f"dataset={data}", "cutoff_len=24", *overrides])


def test_the_config_keys_reach_every_stage(tmp_path, tiny_model_dir, tiny_tokenizer, monkeypatch, caplog):
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "home_cache"))
    chat = write(tmp_path / "chat.jsonl", chat_rows())
    off = load_sft_samples(stage_config("sft", tmp_path, tiny_model_dir, chat, "tokenized_cache=false"),
                           tiny_tokenizer)
    assert not (tmp_path / "home_cache").exists()
    on = stage_config("sft", tmp_path, tiny_model_dir, chat)  # the default: cached
    cold = load_sft_samples(on, tiny_tokenizer)
    with caplog.at_level(logging.INFO, logger="posttrain.data.cache"):
        warm = load_sft_samples(on, tiny_tokenizer)
    assert cold == off and warm == off  # training and eval samples, and the report
    (entry,) = (tmp_path / "home_cache" / "tokenized").iterdir()
    assert f"data: {len(off[0])} samples from the cache at {entry}" in caplog.text

    pairs = write(tmp_path / "pairs.jsonl", pair_rows())
    for name, load in (("dpo", load_pair_samples), ("kto", load_unpaired_samples)):
        plain = load(stage_config(name, tmp_path, tiny_model_dir, pairs, "tokenized_cache=false"), tiny_tokenizer)
        workers = load(stage_config(name, tmp_path, tiny_model_dir, pairs, "preprocessing_num_workers=2"),
                       tiny_tokenizer)
        assert workers == plain, name


def test_rows_json_cannot_carry_are_tokenized_in_process_uncached(tmp_path, tiny_tokenizer):
    import datetime

    from posttrain.data.schema import Conversation

    convs = [Conversation(text="reverse 12 21", tools=[{"since": datetime.date(2026, 1, 1)}], source="a.parquet:1")]
    renderer = ChatRenderer(tiny_tokenizer, None)
    got = tokenize_rows(SFT, convs, renderer, 64, "truncate", TokenizeOptions(num_proc=2, cache_dir=tmp_path / "c"))
    assert got == tokenize_items(SFT, convs, renderer, 64)
    assert not (tmp_path / "c").exists()
