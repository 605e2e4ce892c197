"""load_data: the whole pipeline from a DataConfig."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from qlora.config import DataConfig
from qlora.data import IGNORE_INDEX, DataError, load_data, make_task_dataset, write_jsonl


def test_fraction_split_tokenize_and_report(tmp_path: Path, tok: Any) -> None:
    train, _ = make_task_dataset(40, 0, seed=0)
    path = write_jsonl([*train, {"instruction": "x", "output": None}], tmp_path / "d.jsonl")
    config = DataConfig(path=str(path), eval_fraction=0.1, on_bad_record="skip", seed=1)
    bundle = load_data(config, tok)
    assert (len(bundle.train), len(bundle.eval)) == (36, 4)
    assert bundle.train_records.n_skipped == 1
    assert bundle.eval_records is not None
    assert set(bundle.eval_records.locations).isdisjoint(bundle.train_records.locations)
    assert all(e.labels[0] == IGNORE_INDEX for e in bundle.train)
    summary = bundle.summary()
    assert "1 bad records skipped" in summary
    assert "36 records -> 36 examples" in summary


def test_eval_file_and_packing(tmp_path: Path, tok: Any) -> None:
    train, evals = make_task_dataset(30, 6, seed=0)
    config = DataConfig(
        path=str(write_jsonl(train, tmp_path / "train.jsonl")),
        eval_path=str(write_jsonl(evals, tmp_path / "eval.jsonl")),
        max_seq_len=256,
        packing=True,
    )
    bundle = load_data(config, tok)
    assert bundle.train_report.n_examples == 30
    assert bundle.eval_report.n_examples == 6
    assert sum(len(p.lengths) for p in bundle.train) == 30
    assert len(bundle.train) < 30
    assert all(len(p) <= 256 for p in bundle.train + bundle.eval)
    assert "packed into" in bundle.summary()


def test_missing_path_is_an_error(tok: Any) -> None:
    with pytest.raises(DataError, match=r"data.path is not set"):
        load_data(DataConfig(), tok)
