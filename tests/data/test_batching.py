"""Collate padding, eval split, length grouping and the resumable cursor."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from qlora.data import (
    IGNORE_INDEX,
    BatchLoader,
    DataCursor,
    Example,
    batch_indices,
    collate,
    length_grouped_batches,
    pad_id_of,
    split_eval,
)


def example(n: int, start: int = 10, n_prompt: int = 1) -> Example:
    ids = list(range(start, start + n))
    return Example(ids, [IGNORE_INDEX] * n_prompt + ids[n_prompt:])


def examples(n: int, seed: int = 0) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    return [example(int(k)) for k in torch.randint(2, 40, (n,), generator=g)]


def test_collate_right_pads_with_masked_labels() -> None:
    batch = collate([example(3), example(5, start=20)], pad_id=0)
    assert batch["input_ids"].tolist() == [[10, 11, 12, 0, 0], [20, 21, 22, 23, 24]]
    assert batch["labels"].tolist() == [[-100, 11, 12, -100, -100], [-100, 21, 22, 23, 24]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert "position_ids" not in batch
    padded = collate([example(3)], pad_id=7, pad_to_multiple_of=8)
    assert padded["input_ids"].shape == (1, 8)
    assert padded["input_ids"][0, 3:].eq(7).all()
    assert padded["labels"][0, 3:].eq(IGNORE_INDEX).all()


def test_pad_id_falls_back_to_eos() -> None:
    class Tok:
        pad_token_id = None
        eos_token_id = 2

    assert pad_id_of(Tok()) == 2
    Tok.pad_token_id = 5
    assert pad_id_of(Tok()) == 5


def test_split_eval_is_seeded_disjoint_and_ordered() -> None:
    items = list(range(100))
    train, held = split_eval(items, 0.1, seed=3)
    assert len(held) == 10
    assert sorted(train + held) == items
    assert train == sorted(train)
    assert held == sorted(held)
    assert split_eval(items, 0.1, seed=3) == (train, held)
    assert split_eval(items, 0.1, seed=4)[1] != held
    assert split_eval(items, 0.0) == (items, [])
    assert len(split_eval(list(range(5)), 0.01)[1]) == 1  # at least one when asked
    assert split_eval([1], 0.5) == ([1], [])  # never the last training item


def test_plain_batches_cover_every_example_once_per_epoch() -> None:
    batches = batch_indices(23, 4, seed=0, epoch=0)
    assert sorted(itertools.chain(*batches)) == list(range(23))
    assert batch_indices(23, 4, seed=0, epoch=0) == batches
    assert batch_indices(23, 4, seed=0, epoch=1) != batches
    dropped = batch_indices(23, 4, 0, 0, drop_last=True)
    assert len(dropped) == 5
    assert all(len(b) == 4 for b in dropped)
    assert batch_indices(5, 2, 0, 0, shuffle=False) == [[0, 1], [2, 3], [4]]


def test_length_grouping_is_deterministic_and_reduces_padding() -> None:
    data = examples(400)
    lengths = [len(e) for e in data]
    grouped = length_grouped_batches(lengths, 8, seed=1, epoch=0, mega_batch=10)
    assert grouped == length_grouped_batches(lengths, 8, seed=1, epoch=0, mega_batch=10)
    assert grouped != length_grouped_batches(lengths, 8, seed=1, epoch=1, mega_batch=10)
    assert sorted(itertools.chain(*grouped)) == list(range(400))

    def padding(batches: list[list[int]]) -> int:
        return sum(
            max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches
        )

    assert padding(grouped) < 0.5 * padding(batch_indices(400, 8, seed=1, epoch=0))
    for batch in grouped:  # within a mega-batch, batches are sorted slices
        assert [lengths[i] for i in batch] == sorted((lengths[i] for i in batch), reverse=True)


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("group_by_length", [False, True])
def test_cursor_restore_gives_the_same_subsequent_batches(group_by_length: bool) -> None:
    data = examples(50)

    def loader() -> BatchLoader:
        return BatchLoader(data, 4, pad_id=0, seed=7, group_by_length=group_by_length, mega_batch=3)

    reference = loader()
    assert len(reference) == 13
    full = [b for _ in range(3) for b in reference]  # three epochs, uninterrupted
    assert reference.cursor == DataCursor(3, 0)

    interrupted = loader()
    seen = []
    for i, batch in enumerate(itertools.chain.from_iterable(interrupted for _ in range(2))):
        seen.append(batch)
        if i == 17:  # stop mid-epoch 1, right after a step
            break
    state = interrupted.state_dict()
    assert (state["epoch"], state["index"]) == (1, 5)

    resumed = loader()
    resumed.load_state_dict(state)
    rest = [b for _ in range(2) for b in resumed]
    assert len(seen) + len(rest) == len(full)
    assert all(same(a, b) for a, b in zip(seen + rest, full, strict=True))


def test_cursor_refuses_a_different_order() -> None:
    loader = BatchLoader(examples(10), 4, pad_id=0, seed=1)
    state = loader.state_dict()
    with pytest.raises(ValueError, match="seed=1, this run has 2"):
        BatchLoader(examples(10), 4, pad_id=0, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="n_examples"):
        BatchLoader(examples(11), 4, pad_id=0, seed=1).load_state_dict(state)


def test_epoch_order_does_not_depend_on_global_rng() -> None:
    data = examples(30)
    torch.manual_seed(123)
    first = BatchLoader(data, 4, pad_id=0, seed=5, group_by_length=True).batches(2)
    torch.manual_seed(456)
    random.seed(9)
    assert BatchLoader(data, 4, pad_id=0, seed=5, group_by_length=True).batches(2) == first
