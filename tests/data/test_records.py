"""Reading and validating records: format detection, line-numbered errors, skip mode."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from qlora.data import DataError, detect_format, read_records

ALPACA = {"instruction": "Add.", "input": "2 3", "output": "5"}
CHAT = {
    "messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ]
}
TEXT = {"text": "Once upon a time."}


def jsonl(tmp_path: Path, lines: list[Any], name: str = "data.jsonl") -> Path:
    path = tmp_path / name
    path.write_text(
        "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n"
    )
    return path


@pytest.mark.parametrize(("record", "fmt"), [(ALPACA, "alpaca"), (CHAT, "chat"), (TEXT, "text")])
def test_format_is_detected_from_the_first_record(tmp_path: Path, record: dict, fmt: str) -> None:
    assert detect_format(record) == fmt
    records = read_records(jsonl(tmp_path, [record, record]))
    assert records.format == fmt
    assert len(records) == 2
    assert records.locations == ["line 1", "line 2"]


def test_json_list_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_text(json.dumps([ALPACA, ALPACA, ALPACA], indent=2))
    records = read_records(path)
    assert (records.format, len(records)) == ("alpaca", 3)
    assert records.locations == ["record 0", "record 1", "record 2"]
    blank = jsonl(tmp_path, [ALPACA, "", "   ", ALPACA])
    assert read_records(blank).locations == ["line 1", "line 4"]


def test_explicit_format_overrides_detection(tmp_path: Path) -> None:
    path = jsonl(tmp_path, [TEXT])
    with pytest.raises(DataError, match=r"line 1: alpaca record is missing key 'instruction'"):
        read_records(path, format="alpaca")


def bad_chat(*messages: dict) -> dict:
    return {"messages": list(messages)}


U = {"role": "user", "content": "q"}
A = {"role": "assistant", "content": "a"}

BAD = [
    # (the bad record, format of the good first record, the expected message fragment)
    ({"instruction": "x"}, ALPACA, "alpaca record is missing key 'output'"),
    ({"output": "x"}, ALPACA, "alpaca record is missing key 'instruction'"),
    ({"instruction": "", "output": "y"}, ALPACA, "alpaca 'instruction' is empty"),
    (
        {"instruction": "x", "output": None},
        ALPACA,
        "alpaca 'output' must be a string, got NoneType",
    ),
    ({"instruction": 3, "output": "y"}, ALPACA, "alpaca 'instruction' must be a string, got int"),
    ({"instruction": "x", "input": 5, "output": "y"}, ALPACA, "'input' must be a string"),
    ([1, 2], ALPACA, "expected a JSON object, got list"),
    ("{not json", ALPACA, "invalid JSON"),
    ({"messages": "hi"}, CHAT, "'messages' must be a list, got str"),
    ({"messages": []}, CHAT, "'messages' is empty"),
    (bad_chat(U, "x"), CHAT, "messages[1] must be an object"),
    (bad_chat({"content": "q"}, A), CHAT, "messages[0] is missing key 'role'"),
    (bad_chat({"role": "user"}, A), CHAT, "messages[0] is missing key 'content'"),
    (bad_chat({"role": "bot", "content": "q"}, A), CHAT, "unknown role 'bot'"),
    (bad_chat({"role": "user", "content": 1}, A), CHAT, "messages[0].content must be a string"),
    (bad_chat(U), CHAT, "has no assistant turn"),
    (bad_chat(A, U, A), CHAT, "messages[0] is an assistant turn before any user turn"),
    (bad_chat(U, {"role": "system", "content": "s"}, A), CHAT, "only the first message"),
    ({"text": ""}, TEXT, "'text' is empty"),
    ({"text": ["a"]}, TEXT, "'text' must be a string, got list"),
    ({"txt": "a"}, TEXT, "text record is missing key 'text'"),
]


@pytest.mark.parametrize(("bad", "good", "message"), BAD)
def test_every_bad_record_names_file_and_line(
    tmp_path: Path, bad: Any, good: dict, message: str
) -> None:
    path = jsonl(tmp_path, [good, good, bad, good])
    with pytest.raises(DataError) as info:
        read_records(path)
    text = str(info.value)
    assert text.startswith(f"{path}: line 3: "), text
    assert message in text
    assert "\n" not in text


@pytest.mark.parametrize(("bad", "good", "message"), BAD)
def test_bad_record_in_a_json_list_names_its_index(
    tmp_path: Path, bad: Any, good: dict, message: str
) -> None:
    if isinstance(bad, str):
        return  # one syntax error makes a JSON list unparseable: tested below
    path = tmp_path / "data.json"
    path.write_text(json.dumps([good, bad, good]))
    with pytest.raises(DataError) as info:
        read_records(path)
    assert str(info.value).startswith(f"{path}: record 1: ")
    assert message in str(info.value)


def test_json_list_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": "b",}\n]\n')
    with pytest.raises(DataError, match=rf"^{path}:3: invalid JSON"):
        read_records(path)


def test_skip_mode_counts_and_reports(tmp_path: Path) -> None:
    lines = [ALPACA, {"instruction": "x"}, "{oops", ALPACA, {"instruction": "", "output": "y"}]
    records = read_records(jsonl(tmp_path, lines), on_bad_record="skip")
    assert len(records) == 2
    assert records.locations == ["line 1", "line 4"]
    assert records.n_skipped == 3
    assert [s.split(": ")[1] for s in records.skipped] == ["line 2", "line 3", "line 5"]
    assert "3 bad records skipped" in records.summary()


def test_skip_mode_detects_format_past_a_bad_first_record(tmp_path: Path) -> None:
    records = read_records(jsonl(tmp_path, ["{oops", CHAT]), on_bad_record="skip")
    assert (records.format, len(records), records.n_skipped) == ("chat", 1, 1)


def test_invalid_first_line_is_reported_as_such(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data.jsonl: line 1: invalid JSON"):
        read_records(jsonl(tmp_path, ["{oops", ALPACA]))


def test_undetectable_format(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"line 1: cannot detect the data format.*\['prompt'\]"):
        read_records(jsonl(tmp_path, [{"prompt": "a"}, TEXT]))


@pytest.mark.parametrize("content", ["", "  \n\n", "[]"])
def test_empty_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=rf"^{path}: .*(empty|no records)"):
        read_records(path)


def test_no_usable_records(tmp_path: Path) -> None:
    path = jsonl(tmp_path, [{"instruction": "a", "output": 1}, {"instruction": "b"}])
    with pytest.raises(DataError, match=r"no usable records: all 2 were bad \(first: .*line 1"):
        read_records(path, on_bad_record="skip")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such data file"):
        read_records(tmp_path / "nope.jsonl")


def test_byte_order_mark_is_tolerated(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(ALPACA).encode() + b"\n")
    assert len(read_records(path)) == 1
    assert issubclass(DataError, ValueError)
