"""The whole data pipeline for one `DataConfig`: files -> records -> examples, train and eval.

This is what the trainer and the CLI call; every step's report is kept so that one summary
says what was read, skipped, truncated, split and packed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qlora.config import DataConfig
from qlora.data.encode import EncodeReport, Example, encode_records
from qlora.data.packing import pack_examples, packing_efficiency
from qlora.data.records import DataError, RecordSet, read_records
from qlora.data.split import split_eval

__all__ = ["DataBundle", "load_data"]


@dataclass
class DataBundle:
    """Examples ready for `BatchLoader`, and how they were made.

    Attributes:
        train, eval: the examples (packed when ``config.packing``); eval may be empty.
        train_records, eval_records: the validated records each came from.
        train_report, eval_report: what tokenization cut or dropped.
        config: the configuration used.
    """

    train: list[Example]
    eval: list[Example]
    train_records: RecordSet
    eval_records: RecordSet | None
    train_report: EncodeReport
    eval_report: EncodeReport
    config: DataConfig

    def summary(self) -> str:
        """A few lines for the log: records, skips, truncation, split and packing."""
        lines = [self.train_records.summary()]
        if self.eval_records is not None and self.eval_records is not self.train_records:
            lines.append(self.eval_records.summary())
        lines.append(f"train: {self.train_report.summary()}")
        lines.append(f"eval: {self.eval_report.summary()}")
        if self.config.packing:
            for name, examples in (("train", self.train), ("eval", self.eval)):
                if examples:
                    eff = packing_efficiency(examples, self.config.max_seq_len)
                    lines.append(f"{name}: packed into {len(examples)} sequences ({eff:.0%} full)")
        return "\n".join(lines)


def _subset(records: RecordSet, keep: list[int]) -> RecordSet:
    return RecordSet(
        path=records.path,
        format=records.format,
        records=[records.records[i] for i in keep],
        locations=[records.locations[i] for i in keep],
        n_skipped=records.n_skipped,
        skipped=records.skipped,
    )


def load_data(config: DataConfig, tokenizer: Any) -> DataBundle:
    """Read, validate, split, tokenize and (optionally) pack the data of ``config``.

    Raises:
        DataError: no data path, or any problem `read_records` reports.
    """
    if not config.path:
        raise DataError("data.path is not set: give a JSON or JSONL file of records")
    records = read_records(config.path, config.format, config.on_bad_record)
    if config.eval_path:
        train_records = records
        eval_records: RecordSet | None = read_records(
            config.eval_path, config.format, config.on_bad_record
        )
    else:
        train_idx, eval_idx = split_eval(range(len(records)), config.eval_fraction, config.seed)
        train_records = _subset(records, list(train_idx))
        eval_records = _subset(records, list(eval_idx)) if eval_idx else None
    train, train_report = encode_records(
        tokenizer, train_records, config.max_seq_len, config.train_on_prompt
    )
    if not train:
        raise DataError(
            f"{config.path}: no training example left after tokenization ({train_report.summary()})"
        )
    evals: list[Example] = []
    eval_report = EncodeReport()
    if eval_records is not None:
        evals, eval_report = encode_records(
            tokenizer, eval_records, config.max_seq_len, config.train_on_prompt
        )
    if config.packing:
        train = pack_examples(train, config.max_seq_len)
        evals = pack_examples(evals, config.max_seq_len) if evals else evals
    return DataBundle(train, evals, train_records, eval_records, train_report, eval_report, config)
