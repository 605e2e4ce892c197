"""The default model in tests: skip where it is not installed; a small task dataset to train on."""

from __future__ import annotations

from pathlib import Path

import pytest


def default_model_or_skip() -> Path:
    """The default model's file, or skip the calling test (with the reason) where it is absent."""
    from qlora.models import REGISTRY, ModelLoadError

    try:
        return REGISTRY["smollm2-135m"].locate()
    except ModelLoadError as err:
        pytest.skip(str(err))


def task_train_file(directory: Path, examples: int) -> Path:
    """``directory/train.jsonl``: ``examples`` records of the generated task (seed 0)."""
    from qlora.data import make_task_dataset, write_jsonl

    records, _ = make_task_dataset(examples, 0, seed=0)
    return write_jsonl(records, directory / "train.jsonl")
