"""Packing: the packed forward of a Llama gives each example's own logits and loss."""

from __future__ import annotations

import functools

import pytest
import torch

from qlora.data import (
    IGNORE_INDEX,
    BatchLoader,
    Example,
    block_diagonal_mask,
    collate,
    pack_examples,
    packed_position_ids,
)
from tests.tiny_models import tiny_llama

pytest.importorskip("transformers")


def random_examples(lengths: list[int], seed: int = 0) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(1, 128, (n,), generator=g).tolist()
        n_prompt = n // 2
        out.append(Example(ids, [IGNORE_INDEX] * n_prompt + ids[n_prompt:]))
    return out


def test_pack_examples_best_fit_and_metadata() -> None:
    data = random_examples([7, 3, 5, 2, 6, 1, 4])
    packs = pack_examples(data, max_seq_len=10)
    assert all(len(p) <= 10 for p in packs)
    assert sorted(n for p in packs for n in p.lengths) == sorted(len(e) for e in data)
    assert len(packs) == 3  # 28 tokens in 10-token bins: best fit reaches the minimum
    assert pack_examples(data, 10) == packs  # deterministic
    for pack in packs:
        assert sum(pack.lengths) == len(pack)
        start = 0
        for n in pack.lengths:  # the first label of every packed example is masked
            assert pack.labels[start] == IGNORE_INDEX
            start += n
    with pytest.raises(ValueError, match="max_seq_len"):
        pack_examples(data, max_seq_len=6)


def test_position_ids_and_mask_layout() -> None:
    assert packed_position_ids((3, 2), 7) == [0, 1, 2, 0, 1, 0, 1]
    mask = block_diagonal_mask([(2, 1)], 4)  # [1, 1, 4, 4]
    allowed = (mask[0, 0] == 0).int().tolist()
    assert allowed == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]


@functools.cache
def model_for(impl: str = "sdpa") -> torch.nn.Module:
    """One random 2-layer Llama per attention implementation, shared (read-only) by tests."""
    return tiny_llama(seed=0, attn_implementation=impl)


def separate_logits(model: torch.nn.Module, data: list[Example]) -> list[torch.Tensor]:
    return [model(torch.tensor([e.input_ids])).logits[0] for e in data]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("attention", ["4d", "position_ids"])
def test_packed_forward_equals_separate_forwards(impl: str, attention: str) -> None:
    model = model_for(impl)
    data = random_examples([9, 4, 12, 6, 3, 8, 5], seed=1)
    packs = pack_examples(data, max_seq_len=20)
    batch = collate(packs, pad_id=0, attention=attention)
    assert batch["input_ids"].shape == (len(packs), 20)
    with torch.no_grad():
        # use_cache=False: without it transformers skips its packed-sequence detection
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False)
        alone = separate_logits(model, data)
    by_content = {tuple(e.input_ids): logits for e, logits in zip(data, alone, strict=True)}
    checked = 0
    for row, pack in enumerate(packs):
        start = 0
        for n in pack.lengths:
            ids = tuple(pack.input_ids[start : start + n])
            torch.testing.assert_close(
                packed.logits[row, start : start + n], by_content[ids], atol=1e-5, rtol=0
            )
            start += n
            checked += 1
    assert checked == len(data)


def test_packed_loss_equals_the_loss_of_separate_examples() -> None:
    model = model_for()
    data = random_examples([9, 4, 12, 6, 3, 8, 5], seed=2)
    with torch.no_grad():
        losses, counts = [], []
        for e in data:
            out = model(torch.tensor([e.input_ids]), labels=torch.tensor([e.labels]))
            n = sum(label != IGNORE_INDEX for label in e.labels[1:])
            losses.append(out.loss * n)
            counts.append(n)
        batch = collate(pack_examples(data, 20), pad_id=0)
        packed = model(**batch)
    torch.testing.assert_close(packed.loss, sum(losses) / sum(counts), atol=1e-5, rtol=0)


def test_position_ids_alone_leak_across_examples_when_a_cache_is_used() -> None:
    """Documents the transformers pitfall the 4-D default avoids (see packing.py)."""
    model = model_for()
    data = random_examples([6, 6], seed=3)
    batch = collate(pack_examples(data, 12), pad_id=0, attention="position_ids")
    assert "attention_mask" not in batch
    with torch.no_grad():
        cached = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        alone = separate_logits(model, data)
    second = cached[0, 6:]
    assert not torch.allclose(second, alone[1], atol=1e-3)


def test_loader_batches_packed_examples() -> None:
    packs = pack_examples(random_examples([5] * 12), max_seq_len=16)
    batch = next(iter(BatchLoader(packs, 2, pad_id=0, seed=0, attention="position_ids")))
    assert batch["position_ids"].shape == batch["input_ids"].shape == (2, 15)
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4] * 3
