"""Rendered segments -> token ids and labels (-100 where no loss is taken).

Why segment by segment: tokenizing the whole rendered text and then locating the response
by character offsets breaks whenever a BPE merge spans the prompt/response boundary, and the
model at inference never sees such a merge anyway: it receives the tokenized prompt and
generates the response tokens after it. So each segment (see render.py) is tokenized on its
own (``add_special_tokens=False``: templates spell their special tokens out) and the ids are
concatenated. The boundary is exact by construction; for the default tokenizer the result is
also identical to ``apply_chat_template(tokenize=True)`` (tested).

Labels: a response segment is labeled up to and including its first EOS token (the template's
end-of-turn, e.g. ``<|im_end|>``); what follows it inside the segment (a newline) belongs to
the template's framing and is not learned. A response segment without an EOS token (the plain
template, templates without end markers) gets the EOS id appended, labeled, so that the model
learns to stop. Labels are aligned with ``input_ids`` (the Hugging Face convention): the loss
shifts them by one.

(The module is not called ``tokenize.py`` so that it can never shadow the standard library's
``tokenize`` module.)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from qlora.data.records import DataError, Format, RecordSet
from qlora.data.render import record_messages, segments

__all__ = ["IGNORE_INDEX", "EncodeReport", "Example", "encode_record", "encode_records", "eos_id"]

IGNORE_INDEX = -100  # the label value cross-entropy ignores (torch and transformers default)


@dataclass
class Example:
    """One training sequence.

    Attributes:
        input_ids: [T] token ids.
        labels: [T] ids to predict, or -100 (aligned with input_ids; the loss shifts them).
        lengths: the lengths of the examples packed into this sequence (sum == T);
            ``(T,)`` for an unpacked example. Position ids restart at each boundary.
    """

    input_ids: list[int]
    labels: list[int]
    lengths: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if len(self.labels) != len(self.input_ids):
            raise ValueError(f"{len(self.input_ids)} input ids but {len(self.labels)} labels")
        if not self.lengths:
            self.lengths = (len(self.input_ids),)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_label_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


@dataclass
class EncodeReport:
    """What tokenization did to the records (print it: truncation should never be silent).

    Attributes:
        n_records: records encoded.
        n_examples: sequences produced (text records may split into several).
        n_truncated: alpaca/chat examples cut at ``max_seq_len``.
        n_dropped: examples with no label token left after truncation (prompt too long).
        n_split: text records longer than ``max_seq_len`` split into chunks.
        n_tokens, n_label_tokens: totals over the examples produced.
        dropped: the first few dropped records' locations.
    """

    n_records: int = 0
    n_examples: int = 0
    n_truncated: int = 0
    n_dropped: int = 0
    n_split: int = 0
    n_tokens: int = 0
    n_label_tokens: int = 0
    dropped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        line = (
            f"{self.n_records} records -> {self.n_examples} examples, {self.n_tokens} tokens "
            f"({self.n_label_tokens} with loss)"
        )
        if self.n_truncated:
            line += f"; {self.n_truncated} truncated at max_seq_len"
        if self.n_split:
            line += f"; {self.n_split} long texts split into chunks"
        if self.n_dropped:
            line += f"; {self.n_dropped} dropped (prompt fills max_seq_len: {self.dropped[0]})"
        return line


def eos_id(tokenizer: Any) -> int:
    """The tokenizer's EOS id; `DataError` when it has none (responses could never stop)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise DataError("the tokenizer has no eos_token_id; set one (responses must end)")
    return int(eos)


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _encode_conversation(
    tokenizer: Any, record: dict[str, Any], fmt: Format, train_on_prompt: bool
) -> tuple[list[int], list[int]]:
    eos = eos_id(tokenizer)
    input_ids: list[int] = []
    labels: list[int] = []
    for segment in segments(tokenizer, record_messages(record, fmt)):
        ids = _ids(tokenizer, segment.text)
        if not segment.response:
            input_ids += ids
            labels += ids if train_on_prompt else [IGNORE_INDEX] * len(ids)
            continue
        if eos in ids:
            cut = ids.index(eos) + 1  # learn the end-of-turn token, not the framing after it
            tail = ids[cut:]
            ids = ids[:cut]
        else:
            ids, tail = [*ids, eos], []
        input_ids += ids + tail
        labels += ids + (tail if train_on_prompt else [IGNORE_INDEX] * len(tail))
    return input_ids, labels


def encode_record(
    tokenizer: Any,
    record: dict[str, Any],
    fmt: Format,
    max_seq_len: int,
    train_on_prompt: bool = False,
    report: EncodeReport | None = None,
    location: str = "",
) -> list[Example]:
    """One validated record -> its examples (none, one, or several text chunks).

    Args:
        tokenizer: a Hugging Face tokenizer (chat template used when it has one).
        record: a record that passed `validate_record` for ``fmt``.
        max_seq_len: alpaca/chat examples are truncated to it (counted); text is split into
            chunks of it (counted).
        train_on_prompt: label every token, not only the responses.
        report: counts are added here when given.
        location: where the record came from, for the report's list of dropped records.
    """
    report = report if report is not None else EncodeReport()
    report.n_records += 1
    out: list[Example] = []
    if fmt == "text":
        ids = [*_ids(tokenizer, record["text"]), eos_id(tokenizer)]
        if len(ids) > max_seq_len:
            report.n_split += 1
        for start in range(0, len(ids), max_seq_len):
            chunk = ids[start : start + max_seq_len]
            if len(chunk) >= 2:  # a 1-token chunk has nothing to predict after the shift
                out.append(Example(chunk, list(chunk)))
    else:
        input_ids, labels = _encode_conversation(tokenizer, record, fmt, train_on_prompt)
        if len(input_ids) > max_seq_len:
            report.n_truncated += 1
            input_ids, labels = input_ids[:max_seq_len], labels[:max_seq_len]
        # The first label is never predicted (nothing precedes it), so it does not count.
        if all(label == IGNORE_INDEX for label in labels[1:]):
            report.n_dropped += 1
            if len(report.dropped) < 20:
                report.dropped.append(location or f"record {report.n_records - 1}")
        else:
            out.append(Example(input_ids, labels))
    report.n_examples += len(out)
    report.n_tokens += sum(len(e) for e in out)
    report.n_label_tokens += sum(e.n_label_tokens for e in out)
    return out


def encode_records(
    tokenizer: Any,
    records: RecordSet | Iterable[dict[str, Any]],
    max_seq_len: int,
    train_on_prompt: bool = False,
    fmt: Format | None = None,
) -> tuple[list[Example], EncodeReport]:
    """Encode every record; returns the examples and the report of what was cut or dropped.

    Args:
        records: a `RecordSet` (its format and locations are used) or validated records of
            format ``fmt``.
    """
    report = EncodeReport()
    if isinstance(records, RecordSet):
        fmt, items, where = records.format, records.records, records.locations
        where = [f"{records.path}: {loc}" for loc in where]
    else:
        if fmt is None:
            raise DataError("encode_records needs fmt= for plain lists of records")
        items = list(records)
        where = [f"record {i}" for i in range(len(items))]
    examples: list[Example] = []
    for record, location in zip(items, where, strict=True):
        examples += encode_record(
            tokenizer, record, fmt, max_seq_len, train_on_prompt, report, location
        )
    return examples, report
