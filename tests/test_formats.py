"""Every supported format and file type normalizes to Conversation; every bad input names file:row."""

import csv
import json

import pytest

from posttrain.data.formats import (
    DatasetSpec,
    detect_format,
    load_conversations,
    to_conversation,
)
from posttrain.errors import ConfigError, DataError

CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def load_one(path, **spec):
    convs, _ = load_conversations([DatasetSpec(str(path), **spec)])
    return convs


def roles(conv):
    return [m.role for m in conv.messages]


def load_error(path, **spec) -> str:
    with pytest.raises(DataError) as e:
        load_one(path, **spec)
    return str(e.value)


# ---- formats ----------------------------------------------------------------------------------

def test_detect_format():
    assert detect_format({"messages"}) == "openai"
    assert detect_format({"conversations", "system"}) == "sharegpt"
    assert detect_format({"prompt", "completion"}) == "prompt_completion"
    assert detect_format({"instruction", "input", "output"}) == "alpaca"
    assert detect_format({"instruc", "output"}) == "alpaca"
    assert detect_format({"role", "content", "user", "assistant"}) == "role"
    assert detect_format({"text"}) == "text"
    assert detect_format({"question", "answer"}) is None
    assert detect_format({"prompt"}) is None


def test_prompt_completion_strings_with_system():
    conv = to_conversation({"prompt": "2+2?", "completion": " 4", "system": "Be brief."}, "auto", "d.jsonl", 1)
    assert [(m.role, m.content) for m in conv.messages] == [
        ("system", "Be brief."), ("user", "2+2?"), ("assistant", " 4")]  # text kept exactly
    assert conv.source == "d.jsonl:1"


def test_prompt_completion_message_lists():
    row = {"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
           "completion": [{"role": "assistant", "content": "A"}]}
    conv = to_conversation(row, "prompt_completion", "d.jsonl", 3)
    assert roles(conv) == ["system", "user", "assistant"]
    assert conv.messages[-1].content == "A"


def test_alpaca_with_history_input_system():
    row = {"instruction": "Translate", "input": "bonjour", "output": "hello", "system": "You translate.",
           "history": [["first q", "first a"], ["second q", "second a"]]}
    conv = to_conversation(row, "auto", "a.json", 1)
    assert [(m.role, m.content) for m in conv.messages] == [
        ("system", "You translate."),
        ("user", "first q"), ("assistant", "first a"),
        ("user", "second q"), ("assistant", "second a"),
        ("user", "Translate\nbonjour"), ("assistant", "hello")]


def test_alpaca_empty_input_and_instruc_alias():
    conv = to_conversation({"instruc": "Say hi", "input": "", "output": "hi"}, "auto", "a.json", 1)
    assert [(m.role, m.content) for m in conv.messages] == [("user", "Say hi"), ("assistant", "hi")]


def test_role_record():
    row = {"role": "system", "content": "You are terse.", "user": "Hi", "assistant": "Yo"}
    conv = to_conversation(row, "auto", "r.jsonl", 1)
    assert [(m.role, m.content) for m in conv.messages] == [
        ("system", "You are terse."), ("user", "Hi"), ("assistant", "Yo")]
    conv = to_conversation({"user": "Hi", "assistant": "Yo"}, "auto", "r.jsonl", 2)
    assert roles(conv) == ["user", "assistant"]


def test_openai_tool_calls_and_tools_column():
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    row = {"messages": [
        {"role": "system", "content": "You can call tools."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "name": "get_weather", "tool_call_id": "call_1", "content": "18C"},
        {"role": "assistant", "content": "It is 18C."}],
        "tools": json.dumps([weather])}
    conv = to_conversation(row, "auto", "t.jsonl", 1)
    assert roles(conv) == ["system", "user", "assistant", "tool", "assistant"]
    call = conv.messages[2]
    assert call.content == ""
    assert call.tool_calls == [{"type": "function", "id": "call_1",
                                "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
    assert conv.messages[3].name == "get_weather" and conv.messages[3].tool_call_id == "call_1"
    assert conv.tools == [weather]


def test_sharegpt_function_call_and_observation():
    row = {"conversations": [
        {"from": "human", "value": "What is 3*7?"},
        {"from": "function_call", "value": '{"name": "calc", "arguments": {"expr": "3*7"}}'},
        {"from": "observation", "value": "21"},
        {"from": "gpt", "value": "21."}],
        "system": "Use the calculator.",
        "tools": '[{"name": "calc", "description": "evaluate", "parameters": {"type": "object"}}]'}
    conv = to_conversation(row, "auto", "s.json", 4)
    assert roles(conv) == ["system", "user", "assistant", "tool", "assistant"]
    assert conv.messages[0].content == "Use the calculator."
    assert conv.messages[2].tool_calls == [
        {"type": "function", "function": {"name": "calc", "arguments": {"expr": "3*7"}}}]
    assert conv.messages[3].content == "21"
    # Bare function schemas are wrapped in the OpenAI shape chat templates expect.
    assert conv.tools == [{"type": "function", "function": {
        "name": "calc", "description": "evaluate", "parameters": {"type": "object"}}}]


def test_text():
    conv = to_conversation({"text": "Once upon a time."}, "auto", "c.jsonl", 1)
    assert conv.is_text and conv.text == "Once upon a time." and conv.messages == []


def test_column_mapping(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "Q1", "answer": "A1"}])
    conv, = load_one(path, columns={"prompt": "question", "completion": "answer"})
    assert [(m.role, m.content) for m in conv.messages] == [("user", "Q1"), ("assistant", "A1")]
    msg = load_error(path, columns={"prompt": "query", "completion": "answer"})
    assert msg.startswith(f"{path}:1: ") and "'query'" in msg and "not found" in msg


def test_explicit_formatting_and_unknown_format(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "doc", "messages": CHAT}])
    conv, = load_one(path, formatting="text")
    assert conv.text == "doc"
    with pytest.raises(ConfigError):
        load_one(path, formatting="chatml")


# ---- file types -------------------------------------------------------------------------------

def test_jsonl_sets_source_to_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"messages": CHAT}) + "\n\n" + json.dumps({"messages": CHAT}) + "\n")
    convs, report = load_conversations([DatasetSpec(str(path))])
    assert [c.source for c in convs] == [f"{path}:1", f"{path}:3"]
    assert report.per_source == {str(path): 2} and report.bad_rows == 0


def test_json_list_and_wrapped_object(tmp_path):
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}]
    (tmp_path / "list.json").write_text(json.dumps(rows))
    (tmp_path / "wrapped.json").write_text(json.dumps({"version": 1, "data": rows}))
    for name in ("list.json", "wrapped.json"):
        convs = load_one(tmp_path / name)
        assert [c.messages[-1].content for c in convs] == ["b", "d"]
        assert convs[1].source.endswith(f"{name}:2")


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{"messages": CHAT}, {"messages": CHAT + CHAT}]), path)
    convs = load_one(path)
    assert [len(c.messages) for c in convs] == [2, 4]
    assert convs[1].source == f"{path}:2"


def test_csv_with_json_message_list_cell(tmp_path):
    path = tmp_path / "d.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["messages", "note"])
        w.writerow([json.dumps(CHAT), "[not json"])
        w.writerow([json.dumps(CHAT), "x"])
    convs = load_one(path)
    assert len(convs) == 2 and roles(convs[0]) == ["user", "assistant"]
    assert convs[0].source == f"{path}:2"  # the header is line 1


def test_csv_plain_columns(tmp_path):
    path = tmp_path / "alpaca.csv"
    path.write_text('instruction,input,output\n"Line one\nline two",,ok\nSecond,,fine\n')
    convs = load_one(path)
    assert convs[0].messages[0].content == "Line one\nline two"
    assert convs[1].source == f"{path}:4"  # the first record spans lines 2-3


def test_save_to_disk_folder(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"prompt": "p", "completion": "c"}] * 3).save_to_disk(tmp_path / "ds")
    convs = load_one(tmp_path / "ds")
    assert len(convs) == 3 and convs[2].source == f"{tmp_path / 'ds'}:3"

    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"text": "t"}])}).save_to_disk(tmp_path / "dd")
    assert load_one(tmp_path / "dd")[0].text == "t"

    datasets.DatasetDict({"test": datasets.Dataset.from_list([{"text": "t"}])}).save_to_disk(tmp_path / "nt")
    msg = load_error(tmp_path / "nt")
    assert "'test'" in msg and "no 'train' split" in msg


def test_folder_of_files(tmp_path):
    folder = tmp_path / "data"
    (folder / "sub").mkdir(parents=True)
    write_jsonl(folder / "b.jsonl", [{"messages": CHAT}])
    write_jsonl(folder / "sub" / "c.jsonl", [{"text": "doc"}])  # each file detects its own format
    (folder / "a.json").write_text(json.dumps([{"prompt": "p", "completion": "c"}]))
    (folder / "README.md").write_text("ignored")
    convs = load_one(folder)
    assert [c.source for c in convs] == [
        f"{folder / 'a.json'}:1", f"{folder / 'b.jsonl'}:1", f"{folder / 'sub' / 'c.jsonl'}:1"]
    assert convs[2].text == "doc"


def test_mixing_two_files_with_weights(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"a{i}", "completion": "x"} for i in range(10)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"b{i}", "completion": "y"} for i in range(4)])
    specs = [DatasetSpec(a, weight=0.5), DatasetSpec(b, weight=2.0)]
    convs, report = load_conversations(specs, seed=1)
    assert report.per_source == {a: 5, b: 8}
    firsts = [c.messages[0].content for c in convs]
    assert all(p.startswith("a") for p in firsts[:5]) and all(p.startswith("b") for p in firsts[5:])
    assert len(set(firsts[:5])) == 5  # a subset, no repeats
    assert sorted(firsts[5:]) == sorted([f"b{i}" for i in range(4)] * 2)
    again, _ = load_conversations(specs, seed=1)
    assert [c.source for c in again] == [c.source for c in convs]  # seeded
    other, _ = load_conversations(specs, seed=2)
    assert {c.source for c in other[:5]} != {c.source for c in convs[:5]}

    convs, report = load_conversations([DatasetSpec(a, weight=1.5)], max_samples=12)
    assert len(convs) == 12 and report.per_source == {a: 12}


# ---- bad input: each names the file, the line/row and the problem -----------------------------

def test_malformed_json_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"messages": CHAT}) + '\n{"messages": [\n')
    msg = load_error(path)
    assert msg.startswith(f"{path}:2: invalid JSON")


def test_invalid_utf8_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps({"messages": CHAT}).encode() + b'\n{"text": "caf\xe9"}\n')
    msg = load_error(path)
    assert msg.startswith(f"{path}:2: invalid UTF-8")


def test_invalid_utf8_in_json_and_csv(tmp_path):
    path = tmp_path / "d.json"
    path.write_bytes(b'[\n{"text": "ok"},\n{"text": "caf\xe9"}\n]')
    assert load_error(path).startswith(f"{path}:3: invalid UTF-8")
    path = tmp_path / "d.csv"
    path.write_bytes(b"text\nfine\ncaf\xe9\n")
    assert load_error(path).startswith(f"{path}:3: invalid UTF-8")


def test_malformed_json_file_names_the_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n{"text": "a"},\n{"text": "b",}\n]')
    msg = load_error(path)
    assert msg.startswith(f"{path}:3: invalid JSON")


def test_missing_field(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}, {"text": "no messages here"}])
    msg = load_error(path)
    assert msg.startswith(f"{path}:2: missing field 'messages'") and "openai" in msg
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "x", "input": "y"}])
    msg = load_error(path, formatting="alpaca")
    assert msg.startswith(f"{path}:1: missing field 'output'")


def test_undetectable_row(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    msg = load_error(path)
    assert msg.startswith(f"{path}:1: cannot detect the format") and "columns:" in msg


@pytest.mark.parametrize("row, problem", [
    ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]},
     "message 1 (user) content must be a string, got a number"),
    ({"messages": "hi"}, "field 'messages' must be a list of messages, got a string"),
    ({"prompt": 7, "completion": "x"}, "field 'prompt' must be a string or a list of messages, got a number"),
    ({"instruction": "x", "output": ["a"]}, "field 'output' must be a string, got a list"),
    ({"text": None}, "field 'text' must be a string, got null"),
    ({"messages": CHAT, "tools": "{not json"}, "field 'tools' is not valid JSON"),
])
def test_wrong_type(tmp_path, row, problem):
    path = write_jsonl(tmp_path / "d.jsonl", [row])
    msg = load_error(path)
    assert msg.startswith(f"{path}:1: {problem}")


def test_unknown_role(tmp_path):
    bad = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                        {"role": "bot", "content": "b"}]}
    path = write_jsonl(tmp_path / "data.jsonl", [{"messages": CHAT}] * 6 + [bad])
    assert load_error(path) == (f"{path}:7: message 3 has unknown role 'bot'; "
                                "expected one of system, user, assistant, tool")
    path = write_jsonl(tmp_path / "s.jsonl", [{"conversations": [{"from": "bot", "value": "b"}]}])
    assert "expected one of human, gpt, system, function_call, observation" in load_error(path)


@pytest.mark.parametrize("messages, problem", [
    ([{"role": "assistant", "content": "a"}, {"role": "user", "content": "u"}],
     "message 1 (assistant) comes first"),
    ([{"role": "user", "content": "u"}, {"role": "user", "content": "u"},
      {"role": "assistant", "content": "a"}], "message 2 (user) follows a user message"),
    (CHAT + [{"role": "system", "content": "s"}], "message 3 is a system message"),
    ([{"role": "user", "content": "u"}, {"role": "tool", "content": "t"}, {"role": "assistant", "content": "a"}],
     "message 2 (tool) follows a user message"),
    (CHAT + [{"role": "user", "content": "u"}], "conversation ends with a user message"),
    ([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
     "conversation has no assistant message"),
])
def test_roles_out_of_order(tmp_path, messages, problem):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": messages}])
    msg = load_error(path)
    assert msg.startswith(f"{path}:1: {problem}")


def test_empty_turns_and_empty_text(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT + [{"role": "user", "content": "again"},
                                                                  {"role": "assistant", "content": "  "}]}])
    assert load_error(path).startswith(f"{path}:1: message 4 (assistant) is empty")
    path = write_jsonl(tmp_path / "u.jsonl", [{"prompt": "", "completion": "x"}])
    assert load_error(path).startswith(f"{path}:1: message 1 (user) is empty")
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": " \n"}])
    assert load_error(path).startswith(f"{path}:1: field 'text' is empty")


def test_skip_bad_rows_counts_and_keeps_first_five_reasons(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps({"messages": CHAT})] * 3 + ["{broken"] * 6 + [json.dumps({"messages": []})]
    path.write_text("\n".join(lines) + "\n")
    convs, report = load_conversations([DatasetSpec(str(path))], on_bad_rows="skip")
    assert len(convs) == 3 and report.per_source == {str(path): 3}
    assert report.bad_rows == 7
    assert report.bad_reasons[0].startswith(f"{path}:4: invalid JSON") and len(report.bad_reasons) == 5
    with pytest.raises(DataError, match=f"{path}:4: invalid JSON"):
        load_conversations([DatasetSpec(str(path))], on_bad_rows="error")


def test_file_with_no_surviving_rows(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("{broken\n[1]\n")
    with pytest.raises(DataError) as e:
        load_conversations([DatasetSpec(str(path))], on_bad_rows="skip")
    assert str(e.value).startswith(f"{path}: no usable rows")


def test_missing_path_and_unsupported_type(tmp_path):
    msg = load_error(tmp_path / "nope.jsonl")
    assert "does not exist" in msg and "nope.jsonl" in msg
    (tmp_path / "d.txt").write_text("hi")
    msg = load_error(tmp_path / "d.txt")
    assert "unsupported file type '.txt'" in msg and ".jsonl" in msg and ".parquet" in msg


# ---- content parts, reasoning, LLaMA-Factory v1 ---------------------------------------------------

def test_openai_text_parts_and_reasoning_fields(tmp_path):
    row = {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "Sort 312."}, {"type": "text", "text": "Be quick."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "123"}], "reasoning_content": "ascending"},
        {"role": "user", "content": "and 21?"},
        {"role": "assistant", "content": "12", "thinking": "again"}]}
    [conv] = load_one(write_jsonl(tmp_path / "d.jsonl", [row]))
    assert [m.content for m in conv.messages] == ["Sort 312.\nBe quick.", "123", "and 21?", "12"]
    assert [m.reasoning for m in conv.messages] == [None, "ascending", None, "again"]
    assert conv.messages[1].to_dict() == {"role": "assistant", "content": "123", "reasoning_content": "ascending"}


def test_llamafactory_v1_rows(tmp_path):
    call = json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})
    row = {"messages": [
        {"role": "system", "content": [{"type": "text", "value": "Be brief."}], "loss_weight": 0.0},
        {"role": "user", "content": [{"type": "text", "value": "Weather?"}], "loss_weight": 0.0},
        {"role": "assistant", "content": [{"type": "tool_call", "value": call}], "loss_weight": 1.0},
        {"role": "tool", "content": [{"type": "text", "value": "sunny"}], "loss_weight": 0.0},
        {"role": "assistant", "content": [{"type": "reasoning", "value": "it said sunny"},
                                          {"type": "text", "value": "Sunny."}], "loss_weight": 1.0},
        {"role": "user", "content": [{"type": "text", "value": "Thanks"}], "loss_weight": 0.0},
        {"role": "assistant", "content": [{"type": "text", "value": "You're welcome."}], "loss_weight": 0.0}],
        "tools": json.dumps([{"name": "get_weather", "parameters": {"type": "object"}}])}
    [conv] = load_one(write_jsonl(tmp_path / "v1.jsonl", [row]))
    assert roles(conv) == ["system", "user", "assistant", "tool", "assistant", "user", "assistant"]
    assert conv.messages[2].tool_calls == [{"type": "function", "function": {"name": "get_weather",
                                                                             "arguments": {"city": "Paris"}}}]
    assert (conv.messages[4].content, conv.messages[4].reasoning) == ("Sunny.", "it said sunny")
    assert [m.trained for m in conv.messages if m.role == "assistant"] == [True, True, False]
    assert conv.tools[0]["function"]["name"] == "get_weather"


@pytest.mark.parametrize("part, problem", [
    ({"type": "image_url", "image_url": {"url": "x.png"}}, "content part 1 has type 'image_url'"),
    ({"type": "input_audio", "input_audio": {"data": ""}}, "content part 1 has type 'input_audio'"),
    ({"type": "text", "text": 3}, "content part 1 (text) text must be a string"),
])
def test_non_text_parts_are_refused_with_row_and_type(tmp_path, part, problem):
    row = {"messages": [{"role": "user", "content": [part]}, {"role": "assistant", "content": "ok"}]}
    err = load_error(write_jsonl(tmp_path / "d.jsonl", [row]))
    assert err.startswith(f"{tmp_path / 'd.jsonl'}:1: message 1 (user) ") and problem in err


def test_loss_weight_other_than_0_or_1_is_refused(tmp_path):
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok", "loss_weight": 0.5}]}
    assert "loss_weight 0.5" in load_error(write_jsonl(tmp_path / "d.jsonl", [row]))
