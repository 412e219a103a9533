"""Preference and KTO data: every accepted shape normalizes to the same record, bad rows name file:line."""

from __future__ import annotations

import json

import pytest

from posttrain.data.chat import IGNORE_INDEX
from posttrain.data.formats import DatasetSpec
from posttrain.data.pairs import collate_pairs, collate_unpaired, response_renderer, tokenize_pairs, tokenize_unpaired
from posttrain.data.preference_formats import load_preferences, load_unpaired
from posttrain.data.schema import Message
from posttrain.errors import DataError


def write(tmp_path, rows, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def prefs(tmp_path, rows, **spec):
    return load_preferences([DatasetSpec(path=write(tmp_path, rows), **spec)])[0]


USER, GOOD, BAD = Message("user", "reverse 123"), Message("assistant", "321"), Message("assistant", "123")


@pytest.mark.parametrize("row", [
    {"prompt": "reverse 123", "chosen": "321", "rejected": "123"},
    {"prompt": [{"role": "user", "content": "reverse 123"}], "chosen": [{"role": "assistant", "content": "321"}],
     "rejected": [{"role": "assistant", "content": "123"}]},
    {"chosen": [{"role": "user", "content": "reverse 123"}, {"role": "assistant", "content": "321"}],
     "rejected": [{"role": "user", "content": "reverse 123"}, {"role": "assistant", "content": "123"}]},
    {"conversations": [{"from": "human", "value": "reverse 123"}], "chosen": {"from": "gpt", "value": "321"},
     "rejected": {"from": "gpt", "value": "123"}},
    {"instruction": "reverse 123", "input": "", "chosen": "321", "rejected": "123"},
    {"chosen_messages": [{"role": "user", "content": [{"type": "text", "value": "reverse 123"}], "loss_weight": 0.0},
                         {"role": "assistant", "content": [{"type": "text", "value": "321"}], "loss_weight": 1.0}],
     "rejected_messages": [{"role": "user", "content": [{"type": "text", "value": "reverse 123"}], "loss_weight": 0.0},
                           {"role": "assistant", "content": [{"type": "text", "value": "123"}], "loss_weight": 1.0}]},
], ids=["standard", "conversational", "implicit-prompt", "sharegpt-ranking", "alpaca-ranking", "llamafactory-v1"])
def test_every_preference_shape_gives_the_same_pair(tmp_path, row):
    [pair] = prefs(tmp_path, [row])
    assert (pair.prompt, pair.chosen, pair.rejected, pair.margin) == ([USER], GOOD, BAD, None)
    assert pair.source.endswith("data.jsonl:1")


def test_system_history_margin_and_column_mapping(tmp_path):
    [pair] = prefs(tmp_path, [{"instruction": "reverse 123", "history": [["hi", "hello"]], "system": "be exact",
                               "chosen": "321", "rejected": "123", "margin": 2}])
    assert [m.role for m in pair.prompt] == ["system", "user", "assistant", "user"] and pair.margin == 2.0
    [pair] = prefs(tmp_path, [{"q": "reverse 123", "good": "321", "bad": "123"}],
                   columns={"prompt": "q", "chosen": "good", "rejected": "bad"})
    assert (pair.prompt, pair.chosen, pair.rejected) == ([USER], GOOD, BAD)


@pytest.mark.parametrize("row, problem", [
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "identical"),
    ({"prompt": "p", "chosen": "  ", "rejected": "x"}, "chosen response is empty"),
    ({"prompt": "p", "chosen": "x", "rejected": ""}, "rejected response is empty"),
    ({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}],
      "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "y"}]}, "prompt mismatch"),
    ({"chosen": "x", "rejected": "y"}, "must be a whole conversation"),
    ({"prompt": "p", "chosen": "x"}, "missing field 'rejected'"),
    ({"prompt": "p", "chosen": "x", "rejected": "y", "margin": "big"}, "margin"),
    ({"prompt": "p", "chosen": [{"role": "user", "content": "x"}], "rejected": "y"}, "must be an assistant message"),
])
def test_bad_pairs_name_file_line_and_problem(tmp_path, row, problem):
    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    with pytest.raises(DataError) as err:
        prefs(tmp_path, [good, row])
    assert "data.jsonl:2:" in str(err.value) and problem in str(err.value)


def test_unpaired_rows_take_any_sft_shape_plus_a_label(tmp_path):
    rows = [{"prompt": "reverse 123", "completion": "321", "label": True},
            {"messages": [{"role": "user", "content": "reverse 123"}, {"role": "assistant", "content": "123"}],
             "label": False},
            {"conversations": [{"from": "human", "value": "reverse 123"}, {"from": "gpt", "value": "321"}],
             "kto_tag": True}]
    items = []
    for i, row in enumerate(rows):  # one file per format: a file keeps the format of its first row
        items += load_unpaired([DatasetSpec(path=write(tmp_path, [row], f"u{i}.jsonl"))])[0]
    assert [(u.prompt, u.completion, u.label) for u in items] == [([USER], GOOD, True), ([USER], BAD, False),
                                                                  ([USER], GOOD, True)]
    with pytest.raises(DataError, match=r"u9.jsonl:1: field 'label' must be true or false"):
        load_unpaired([DatasetSpec(path=write(tmp_path, [{"prompt": "p", "completion": "c", "label": "yes"}],
                                             "u9.jsonl"))])
    with pytest.raises(DataError, match="u8.jsonl:1: missing field 'label'.*or chosen \\+ rejected for a pair"):
        load_unpaired([DatasetSpec(path=write(tmp_path, [{"prompt": "p", "completion": "c"}], "u8.jsonl"))])


def test_kto_takes_preference_pairs_unpaired(tmp_path, tiny_tokenizer):
    # TRL's unpair_preference_dataset: a pair's chosen is a desirable row, its rejected an undesirable one.
    pairs = write(tmp_path, [{"prompt": "reverse 123", "chosen": "321", "rejected": "123"},
                             {"prompt": "reverse 45", "chosen": "54", "rejected": "45"}], "pairs.jsonl")
    sharegpt = write(tmp_path, [{"conversations": [{"from": "human", "value": "reverse 78"}],
                                 "chosen": {"from": "gpt", "value": "87"}, "rejected": {"from": "gpt", "value": "78"}}],
                     "sharegpt.jsonl")
    labelled = write(tmp_path, [{"prompt": "reverse 6", "completion": "6", "label": True}], "kto.jsonl")
    rows, report = load_unpaired([DatasetSpec(path=labelled), DatasetSpec(path=pairs), DatasetSpec(path=sharegpt)])
    got = [(u.prompt[-1].content, u.completion.content, u.label, u.source.rsplit("/", 1)[-1]) for u in rows]
    assert got == [("reverse 6", "6", True, "kto.jsonl:1"),
                   ("reverse 123", "321", True, "pairs.jsonl:1"), ("reverse 45", "54", True, "pairs.jsonl:2"),
                   ("reverse 78", "87", True, "sharegpt.jsonl:1"),
                   ("reverse 123", "123", False, "pairs.jsonl:1"), ("reverse 45", "45", False, "pairs.jsonl:2"),
                   ("reverse 78", "78", False, "sharegpt.jsonl:1")]
    assert report.per_source == {labelled: 1, pairs: 2, sharegpt: 1}  # rows read: a pair is one row
    # Chosen rows first, then rejected: each row's mismatched twin (the next row's completion) answers another prompt.
    samples, _ = tokenize_unpaired(rows, response_renderer(tiny_tokenizer, None), cutoff_len=128)
    for s in samples:
        assert tiny_tokenizer.decode(s.mismatched.input_ids) != tiny_tokenizer.decode(s.sample.input_ids)
    # A bad pair is reported like any bad pair, with file:line.
    bad = write(tmp_path, [{"prompt": "p", "chosen": "a", "rejected": "a"}], "bad.jsonl")
    with pytest.raises(DataError, match="bad.jsonl:1: chosen and rejected are identical"):
        load_unpaired([DatasetSpec(path=bad)])


def test_pairs_share_prompt_tokens_train_only_the_response_and_batch_as_one_tensor(tmp_path, tiny_tokenizer):
    pairs = prefs(tmp_path, [{"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                                         {"role": "user", "content": "reverse 123"}], "chosen": "321", "rejected": "12"},
                             {"prompt": "reverse 45", "chosen": "54", "rejected": "45", "margin": 1.5}])
    samples, report = tokenize_pairs(pairs, response_renderer(tiny_tokenizer, None), cutoff_len=256)
    assert report.samples == 2
    s = samples[0]
    trained_c = [t for t, l in zip(s.chosen.input_ids, s.chosen.labels) if l != IGNORE_INDEX]
    assert tiny_tokenizer.decode(trained_c) == "321<|im_end|>"  # the earlier assistant turn is not trained
    first_c = s.chosen.labels.index(next(l for l in s.chosen.labels if l != IGNORE_INDEX))
    first_r = s.rejected.labels.index(next(l for l in s.rejected.labels if l != IGNORE_INDEX))
    assert first_c == first_r and s.chosen.input_ids[:first_c] == s.rejected.input_ids[:first_r]

    batch = collate_pairs(samples, tiny_tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 4 and batch["num_pairs"] == 2
    assert batch["margin"].tolist() == [0.0, 1.5] and "ref_chosen" not in batch
    assert batch["input_ids"][2, :len(s.rejected.input_ids)].tolist() == s.rejected.input_ids  # rejected after chosen


def test_cutoff_drops_pairs_with_nothing_left_to_train(tmp_path, tiny_tokenizer):
    pairs = prefs(tmp_path, [{"prompt": "x " * 200, "chosen": "a", "rejected": "b"},
                             {"prompt": "reverse 12", "chosen": "21", "rejected": "12"}])
    samples, report = tokenize_pairs(pairs, response_renderer(tiny_tokenizer, None), cutoff_len=32)
    assert len(samples) == 1 and report.dropped_untrained == 1 and report.truncated == 1


def test_unpaired_rows_get_a_mismatched_twin_for_the_kl_estimate(tmp_path, tiny_tokenizer):
    rows = load_unpaired([DatasetSpec(path=write(tmp_path, [
        {"prompt": "reverse 12", "completion": "21", "label": True},
        {"prompt": "reverse 345", "completion": "999", "label": False}]))])[0]
    samples, _ = tokenize_unpaired(rows, response_renderer(tiny_tokenizer, None), cutoff_len=128)
    decode = lambda seq: tiny_tokenizer.decode(seq.input_ids)  # noqa: E731
    assert "reverse 12" in decode(samples[0].mismatched) and "999" in decode(samples[0].mismatched)
    batch = collate_unpaired(samples, tiny_tokenizer.pad_token_id)
    assert batch["label"].tolist() == [True, False] and batch["input_ids"].shape[0] == 4
