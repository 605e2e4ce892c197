"""Read and validate training records from JSON or JSONL files.

A bad record deep inside a large file should stop a run *before* any compute is spent, with
a message that points at the exact place to fix. So every record is validated up front and
every error names the file and the JSONL line (1-based) or, for a JSON list, the record
index (0-based), plus what is wrong. With ``on_bad_record="skip"`` bad records are dropped
and counted instead, and the count and the first few reasons are kept for the report.

Formats (detected per file from the first record's keys unless given):

* ``alpaca``: ``{"instruction": str, "input": str (optional), "output": str}``
* ``chat``: ``{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}``
  with at least one assistant turn, every assistant turn after a user turn; a system message
  may only come first.
* ``text``: ``{"text": str}`` (continued pre-training: every token is a label).

An empty (or blank) response - an alpaca ``output`` or an assistant turn - is a valid example,
not a bad record: real data sets have them (Alpaca does), and "say nothing" is something to
learn. Its label is the end of the response (the template's end-of-turn / the EOS token), so
it still has one labelled token. Such records are counted (`RecordSet.n_empty_responses`) and
the count is shown in the summary.

Extra keys (ids, metadata) are allowed and ignored: real data sets carry them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "FORMATS",
    "ROLES",
    "DataError",
    "Format",
    "RecordSet",
    "detect_format",
    "has_empty_response",
    "read_records",
    "validate_record",
]

Format = Literal["alpaca", "chat", "text"]
FORMATS: tuple[str, ...] = ("alpaca", "chat", "text")
ROLES: tuple[str, ...] = ("system", "user", "assistant")

# How many skip reasons a report keeps verbatim (the count is always exact).
_KEEP_REASONS = 20


class DataError(ValueError):
    """A data file or record is unusable; the one-line message names the file and the place."""


@dataclass
class RecordSet:
    """The validated records of one file and what was skipped on the way.

    Attributes:
        path: the file they came from.
        format: the (detected or given) format of every record.
        records: the valid records, in file order.
        locations: for each record, where it was ("line 7" or "record 3"), for later messages.
        n_skipped: bad records dropped under ``on_bad_record="skip"``.
        skipped: the first few reasons, each a full one-line error message.
    """

    path: str
    format: Format
    records: list[dict[str, Any]]
    locations: list[str]
    n_skipped: int = 0
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def n_empty_responses(self) -> int:
        """Records with an empty or blank response (valid; worth knowing about)."""
        return sum(has_empty_response(record, self.format) for record in self.records)

    def summary(self) -> str:
        """One line for logs: how many records, which format, how many skipped."""
        line = f"{self.path}: {len(self.records)} {self.format} records"
        if empty := self.n_empty_responses:
            line += f" ({empty} with an empty response)"
        if self.n_skipped:
            line += f", {self.n_skipped} bad records skipped (first: {self.skipped[0]})"
        return line


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and value.strip() != ""


def has_empty_response(record: dict[str, Any], fmt: Format) -> bool:
    """Whether a valid ``fmt`` record has an empty or blank response (alpaca ``output`` or
    any assistant turn); text records have none."""
    if fmt == "alpaca":
        return not record["output"].strip()
    if fmt == "chat":
        return any(
            m["role"] == "assistant" and not m["content"].strip() for m in record["messages"]
        )
    return False


def _check_alpaca(record: dict[str, Any]) -> str | None:
    for key in ("instruction", "output"):
        if key not in record:
            return f"alpaca record is missing key {key!r}"
        if not isinstance(record[key], str):
            return f"alpaca {key!r} must be a string, got {type(record[key]).__name__}"
    if not record["instruction"].strip():  # an empty output is valid: "say nothing"
        return "alpaca 'instruction' is empty"
    extra = record.get("input")
    if extra is not None and not isinstance(extra, str):
        return f"alpaca 'input' must be a string, got {type(extra).__name__}"
    system = record.get("system")
    if system is not None and not isinstance(system, str):
        return f"alpaca 'system' must be a string, got {type(system).__name__}"
    return None


def _check_chat(record: dict[str, Any]) -> str | None:
    if "messages" not in record:
        return "chat record is missing key 'messages'"
    messages = record["messages"]
    if not isinstance(messages, list):
        return f"'messages' must be a list, got {type(messages).__name__}"
    if not messages:
        return "'messages' is empty"
    has_assistant = False
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"messages[{i}] must be an object, got {type(message).__name__}"
        for key in ("role", "content"):
            if key not in message:
                return f"messages[{i}] is missing key {key!r}"
        role, content = message["role"], message["content"]
        if role not in ROLES:
            return f"messages[{i}] has unknown role {role!r} (valid: {', '.join(ROLES)})"
        if not isinstance(content, str):
            return f"messages[{i}].content must be a string, got {type(content).__name__}"
        if role == "system" and i != 0:
            return f"messages[{i}] is a system message; only the first message may be one"
        if role == "assistant":
            if not any(m.get("role") == "user" for m in messages[:i] if isinstance(m, dict)):
                return f"messages[{i}] is an assistant turn before any user turn"
            has_assistant = True  # empty content too: its end-of-turn is the label
    if not has_assistant:
        return "chat record has no assistant turn (nothing to learn)"
    return None


def _check_text(record: dict[str, Any]) -> str | None:
    if "text" not in record:
        return "text record is missing key 'text'"
    if not isinstance(record["text"], str):
        return f"'text' must be a string, got {type(record['text']).__name__}"
    if not record["text"].strip():
        return "'text' is empty"
    return None


_CHECKS = {"alpaca": _check_alpaca, "chat": _check_chat, "text": _check_text}


def validate_record(record: Any, fmt: Format) -> str | None:
    """What is wrong with ``record`` as a ``fmt`` record, or None when it is usable."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    return _CHECKS[fmt](record)


def detect_format(record: Any) -> Format | None:
    """The format a record's keys announce: messages -> chat, instruction -> alpaca, text."""
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        return "chat"
    if "instruction" in record or "output" in record:
        return "alpaca"
    if "text" in record:
        return "text"
    return None


def _raw_records(path: Path, text: str) -> Iterator[tuple[str, Any, str | None]]:
    """(location, parsed value or None, parse error or None) for every record of a file."""
    if text.lstrip().startswith("["):
        # A JSON list: one parse; a syntax error anywhere makes the whole file unusable.
        try:
            values = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path}:{err.lineno}: invalid JSON ({err.msg} at column {err.colno})"
            ) from None
        if not isinstance(values, list):  # pragma: no cover - '[' always parses to a list
            raise DataError(f"{path}: expected a JSON list of records")
        for index, value in enumerate(values):
            yield f"record {index}", value, None
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue  # blank lines (a trailing newline, a separator) are not records
        try:
            yield f"line {lineno}", json.loads(line), None
        except json.JSONDecodeError as err:
            yield f"line {lineno}", None, f"invalid JSON ({err.msg} at column {err.colno})"


def read_records(
    path: str | os.PathLike,
    format: Literal["auto", "alpaca", "chat", "text"] = "auto",
    on_bad_record: Literal["error", "skip"] = "error",
) -> RecordSet:
    """Read and validate every record of a JSON list or JSONL file.

    Args:
        path: the file. A JSON list if its first non-blank character is ``[``, else JSONL.
        format: the records' format, or "auto" to detect it from the first record's keys
            (under "skip", from the first record whose keys announce a format).
        on_bad_record: "error" raises `DataError` at the first bad record; "skip" drops and
            counts bad records.

    Raises:
        DataError: a missing or empty file, a bad record (under "error"), an undetectable
            format, or no usable record at all.
    """
    path = Path(path)
    if format not in ("auto", *FORMATS):
        raise DataError(f"{path}: unknown format {format!r}; choose auto, {', '.join(FORMATS)}")
    if on_bad_record not in ("error", "skip"):
        raise DataError(f"on_bad_record={on_bad_record!r}; choose 'error' or 'skip'")
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    try:
        text = path.read_text(encoding="utf-8-sig")  # tolerate a byte-order mark
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if not text.strip():
        raise DataError(f"{path}: the file is empty; expected JSON or JSONL records")

    raw = list(_raw_records(path, text))
    if not raw:
        raise DataError(f"{path}: the file holds no records (an empty JSON list?)")
    fmt: Format
    if format != "auto":
        fmt = format
    else:
        detected = None
        for _, value, _ in raw:
            detected = detect_format(value)
            if detected is not None or on_bad_record == "error":
                break
        if detected is None:
            location, value, error = raw[0]
            if error is not None:
                raise DataError(f"{path}: {location}: {error}")
            seen = f"keys {sorted(value)}" if isinstance(value, dict) else type(value).__name__
            raise DataError(
                f"{path}: {location}: cannot detect the data format from the first record "
                f"({seen}); expected 'messages' (chat), 'instruction'/'output' (alpaca) or "
                f"'text' (text), or set data.format"
            )
        fmt = detected

    result = RecordSet(path=str(path), format=fmt, records=[], locations=[])
    for location, value, error in raw:
        problem = error or validate_record(value, fmt)
        if problem is None:
            result.records.append(value)
            result.locations.append(location)
            continue
        message = f"{path}: {location}: {problem}"
        if on_bad_record == "error":
            raise DataError(message)
        result.n_skipped += 1
        if len(result.skipped) < _KEEP_REASONS:
            result.skipped.append(message)
    if not result.records:
        raise DataError(
            f"{path}: no usable records: all {result.n_skipped} were bad "
            f"(first: {result.skipped[0]})"
        )
    return result
