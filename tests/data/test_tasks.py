"""The demo task generator, exact match, atomic JSONL writing and batched generation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from qlora.data import (
    exact_match,
    generate_answers,
    make_task_dataset,
    read_records,
    score,
    write_jsonl,
)
from qlora.data.tasks import INSTRUCTION, WORDS
from tests.tiny_models import tiny_llama


def test_task_dataset_is_seeded_and_correct() -> None:
    train, evals = make_task_dataset(200, 50, seed=0)
    assert (len(train), len(evals)) == (200, 50)
    assert make_task_dataset(200, 50, seed=0) == (train, evals)
    assert make_task_dataset(200, 50, seed=1) != (train, evals)
    assert make_task_dataset(10, 50, seed=0)[1] == evals  # eval set independent of n_train
    inputs = [r["input"] for r in train + evals]
    assert len(set(inputs)) == len(inputs)  # no eval input is trained on
    for record in train + evals:
        words = record["input"].split()
        assert record["instruction"] == INSTRUCTION
        assert len(words) == 4
        assert len(set(words)) == 4
        assert set(words) <= set(WORDS)
        assert record["output"].split() == words[::-1]


def test_task_words_are_single_tokens(tok: Any) -> None:
    for word in WORDS:
        assert len(tok(" " + word, add_special_tokens=False)["input_ids"]) == 1, word


def test_exact_match_normalizes_whitespace_only() -> None:
    assert exact_match("  c b\n a ", "c b a")
    assert exact_match("c  b\ta", "c b a")
    assert not exact_match("C b a", "c b a")
    assert not exact_match("c b a.", "c b a")
    assert not exact_match("", "c b a")


def test_write_jsonl_is_atomic_and_readable(tmp_path: Path) -> None:
    train, _ = make_task_dataset(5, 0, seed=0)
    path = write_jsonl(train, tmp_path / "sub" / "train.jsonl")
    assert [json.loads(line) for line in path.read_text().splitlines()] == train
    assert read_records(path).format == "alpaca"

    def broken() -> Any:
        yield train[0]
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_jsonl(broken(), path)
    assert [json.loads(line) for line in path.read_text().splitlines()] == train  # untouched
    assert sorted(p.name for p in path.parent.iterdir()) == ["train.jsonl"]  # no temp left


def test_batched_left_padded_generation_matches_one_by_one(tok: Any) -> None:
    model = tiny_llama(seed=0, vocab=len(tok), hidden=32, intermediate=64)
    records = [
        {"instruction": INSTRUCTION, "input": "a", "output": "a"},
        {"instruction": INSTRUCTION, "input": "apple river stone cloud green", "output": "x"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]},
    ]
    with torch.no_grad():
        batched = generate_answers(model, tok, records, max_new_tokens=4, batch_size=3)
        single = generate_answers(model, tok, records, max_new_tokens=4, batch_size=1)
    assert batched == single
    assert all(isinstance(a, str) for a in batched)
    result = score(model, tok, records, max_new_tokens=4, batch_size=3)
    assert (result.n, result.predictions, result.answers) == (3, batched, ["a", "x", "x"])
    assert result.accuracy == result.n_correct / 3


def test_batch_decoder_answers_equal_the_left_padded_reference(tok: Any) -> None:
    from qlora.generate import greedy_decoder

    model = tiny_llama(seed=0, vocab=len(tok), hidden=32, intermediate=64)
    records = [
        {"instruction": INSTRUCTION, "input": "a", "output": "a"},
        {"instruction": INSTRUCTION, "input": "apple river stone cloud green", "output": "x"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]},
    ]
    reference = generate_answers(model, tok, records, max_new_tokens=6, batch_size=3)
    calls: list[int] = []
    decoder = greedy_decoder(model, max_batch=2)  # 3 prompts: one joins when a row leaves

    def decode(prompts: Any, max_new_tokens: int, stop: Any) -> list[list[int]]:
        calls.append(len(prompts))
        assert set(stop) == {tok.eos_token_id}
        return decoder(prompts, max_new_tokens, stop)

    assert generate_answers(model, tok, records, max_new_tokens=6, decode=decode) == reference
    assert calls == [3]
    result = score(model, tok, records, max_new_tokens=6, decode=decode)
    assert result.predictions == reference
