"""read_rows: row numbers, bad rows yielded (not raised), file-level errors raised early."""

import json

import pytest

from posttrain.data.formats import DatasetSpec, load_conversations
from posttrain.data.sources import BadRow, RawRow, read_rows
from posttrain.errors import DataError


def test_jsonl_bad_rows_are_yielded_in_place(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\n\n{oops\n[1, 2]\n\xff\n  \n{"a": 2}\n')
    rows = list(read_rows(str(path)))
    assert [(type(r).__name__, r.row) for r in rows] == [
        ("RawRow", 1), ("BadRow", 3), ("BadRow", 4), ("BadRow", 5), ("RawRow", 7)]
    assert rows[0].data == {"a": 1}  # the BOM is not part of the first line
    assert "expected a JSON object, got a list" in rows[2].problem
    assert str(rows[3].error()).startswith(f"{path}:5: invalid UTF-8")


def test_errors_about_the_whole_input_raise_at_call(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_rows(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="download it first"):
        read_rows("someorg/somedataset")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="no data files"):
        read_rows(str(tmp_path / "empty_dir"))


def test_empty_file_is_an_error(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataError, match="no rows"):
        list(read_rows(str(path)))


def test_json_lines_under_a_json_name(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('{"text": "a"}\n{"text": "b"}\n')
    assert [(r.data["text"], r.row) for r in read_rows(str(path))] == [("a", 1), ("b", 2)]


def test_json_object_without_a_row_list(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "x"}]}))
    with pytest.raises(DataError, match="expected a list of rows"):
        list(read_rows(str(path)))


def test_json_non_object_element_is_a_bad_row(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[{"text": "a"}, "b"]')
    rows = list(read_rows(str(path)))
    assert isinstance(rows[0], RawRow) and isinstance(rows[1], BadRow) and rows[1].row == 2


def test_csv_cell_count_mismatch_and_bracket_text(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('text,n\n[INST] hi,1\nonly one\n{"k": [1]},2\n')
    rows = list(read_rows(str(path)))
    assert rows[0].data == {"text": "[INST] hi", "n": "1"}
    assert isinstance(rows[1], BadRow) and rows[1].row == 3 and "1 cells" in rows[1].problem
    assert rows[2].data["text"] == {"k": [1]}


def test_parquet_nulls_from_arrow_structs_mean_absent(tmp_path):
    """Arrow gives every message every key of any message; the nulls must not count as values."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    messages = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "w", "arguments": "{}"}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
        {"role": "assistant", "content": "Sunny."},
    ]
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{"messages": messages, "tools": None}]), path)
    conv, = load_conversations([DatasetSpec(str(path))])[0]
    assert [m.role for m in conv.messages] == ["user", "assistant", "tool", "assistant"]
    assert conv.messages[0].tool_calls is None and conv.messages[2].tool_call_id == "c1"
    assert conv.tools is None


def test_save_to_disk_folder_inside_a_plain_folder(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"text": "saved"}]).save_to_disk(tmp_path / "mix" / "saved")
    (tmp_path / "mix" / "z.jsonl").write_text('{"text": "file"}\n')
    texts = [r.data["text"] for r in read_rows(str(tmp_path / "mix"))]
    assert texts == ["saved", "file"]  # state.json / dataset_info.json are not read as data
