"""Batches: padding collate, length-grouped order, and a resumable iterator.

Order is a pure function of (seed, epoch, number of examples, batch size): no global RNG is
touched, so a run resumed from a `DataCursor` ``(epoch, index)`` sees exactly the batches the
uninterrupted run would have seen next.

Length grouping (as in Hugging Face's ``group_by_length``): each epoch the examples are
shuffled, cut into mega-batches of ``mega_batch`` × ``batch_size`` examples, each mega-batch
is sorted by length (longest first) and cut into batches, and the batches are shuffled. Batches
then hold examples of similar length (little padding) while the epoch stays random.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

from qlora.data.encode import IGNORE_INDEX, Example
from qlora.data.packing import block_diagonal_mask, packed_position_ids

__all__ = [
    "BatchLoader",
    "DataCursor",
    "batch_indices",
    "collate",
    "length_grouped_batches",
    "pad_id_of",
]


def pad_id_of(tokenizer: Any) -> int:
    """The id used for padding: the tokenizer's pad token, else its EOS (labels mask it)."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    raise ValueError("the tokenizer has neither a pad_token_id nor an eos_token_id")


def collate(
    examples: Sequence[Example],
    pad_id: int,
    pad_to_multiple_of: int = 1,
    attention: Literal["4d", "position_ids"] = "4d",
    mask_dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples into a batch.

    Unpacked examples give ``input_ids``, ``labels`` (-100 on padding) and a 2-D
    ``attention_mask`` (1 on tokens, 0 on padding). If any example is packed, the batch gets
    ``position_ids`` restarting at each example and, with ``attention="4d"`` (default), a 4-D
    block-diagonal additive ``attention_mask`` in ``mask_dtype`` (the model's compute dtype),
    which keeps examples apart whatever the model's cache settings; with
    ``attention="position_ids"`` no mask at all, so that transformers derives the blocks from
    the position ids itself (the model must then be called with ``use_cache=False``; see
    packing.py).

    Returns:
        input_ids [B, T] long, labels [B, T] long, and attention_mask [B, T] long (unpacked)
        or position_ids [B, T] long (+ attention_mask [B, 1, T, T] ``mask_dtype`` for "4d").
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    longest = max(len(e) for e in examples)
    total = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(examples), total), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), total), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        input_ids[row, : len(example)] = torch.tensor(example.input_ids, dtype=torch.long)
        labels[row, : len(example)] = torch.tensor(example.labels, dtype=torch.long)
    batch = {"input_ids": input_ids, "labels": labels}
    if all(len(e.lengths) == 1 for e in examples):
        mask = torch.zeros((len(examples), total), dtype=torch.long)
        for row, example in enumerate(examples):
            mask[row, : len(example)] = 1
        batch["attention_mask"] = mask
        return batch
    batch["position_ids"] = torch.tensor(
        [packed_position_ids(e.lengths, total) for e in examples], dtype=torch.long
    )
    if attention == "4d":
        batch["attention_mask"] = block_diagonal_mask(
            [e.lengths for e in examples], total, mask_dtype
        )
    elif attention != "position_ids":
        raise ValueError(f"attention={attention!r}; choose '4d' or 'position_ids'")
    return batch


def _rng(seed: int, epoch: int) -> random.Random:
    # A private generator per (seed, epoch): the order never depends on what else ran.
    return random.Random(seed * 1_000_003 + epoch)


def _chunks(indices: list[int], size: int, drop_last: bool) -> list[list[int]]:
    batches = [indices[i : i + size] for i in range(0, len(indices), size)]
    if drop_last and batches and len(batches[-1]) < size:
        batches.pop()
    return batches


def length_grouped_batches(
    lengths: Sequence[int],
    batch_size: int,
    seed: int,
    epoch: int,
    mega_batch: int = 50,
    drop_last: bool = False,
) -> list[list[int]]:
    """One epoch's batches of example indices, grouped by length (see module docstring)."""
    rng = _rng(seed, epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    size = mega_batch * batch_size
    batches: list[list[int]] = []
    for start in range(0, len(order), size):
        mega = sorted(order[start : start + size], key=lambda i: -lengths[i])  # stable: seeded
        batches += _chunks(mega, batch_size, drop_last=False)
    if drop_last:
        batches = [b for b in batches if len(b) == batch_size]
    rng.shuffle(batches)
    return batches


def batch_indices(
    n: int,
    batch_size: int,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    drop_last: bool = False,
) -> list[list[int]]:
    """One epoch's batches of example indices: a seeded shuffle (or file order), chunked."""
    order = list(range(n))
    if shuffle:
        _rng(seed, epoch).shuffle(order)
    return _chunks(order, batch_size, drop_last)


@dataclass
class DataCursor:
    """Where a `BatchLoader` is: ``index`` batches of epoch ``epoch`` were already handed out."""

    epoch: int = 0
    index: int = 0


class BatchLoader:
    """Deterministic, resumable batches over a list of examples.

    ``iter(loader)`` yields the rest of the current epoch and moves the cursor to the next
    epoch; iterate again for the next one (``len(loader)`` is the batches per epoch). The
    cursor advances *before* a batch is yielded, so a checkpoint written after a step resumes
    with the following batch: ``state = loader.state_dict()`` ... ``loader.load_state_dict(state)``.

    Args:
        examples: the (possibly packed) examples.
        batch_size: examples per batch.
        pad_id: padding token id (`pad_id_of`).
        seed: the order's seed; the order of epoch e is a function of (seed, e) only.
        shuffle: shuffle each epoch (False: file order, for evaluation).
        group_by_length: batch similar lengths together (needs ``shuffle``).
        mega_batch: mega-batch size in batches for length grouping.
        drop_last: drop a final incomplete batch.
        collate_kwargs: passed to `collate` (``pad_to_multiple_of``, ``attention``, ...).
    """

    def __init__(
        self,
        examples: Sequence[Example],
        batch_size: int,
        pad_id: int,
        seed: int = 0,
        shuffle: bool = True,
        group_by_length: bool = False,
        mega_batch: int = 50,
        drop_last: bool = False,
        **collate_kwargs: Any,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not examples:
            raise ValueError("no examples to batch")
        self.examples = examples
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.seed = seed
        self.shuffle = shuffle
        self.group_by_length = group_by_length and shuffle
        self.mega_batch = mega_batch
        self.drop_last = drop_last
        self.collate_kwargs = collate_kwargs
        self.cursor = DataCursor()
        self._lengths = [len(e) for e in examples]

    def batches(self, epoch: int) -> list[list[int]]:
        """The example indices of every batch of ``epoch`` (pure: same args, same answer)."""
        if self.group_by_length:
            return length_grouped_batches(
                self._lengths, self.batch_size, self.seed, epoch, self.mega_batch, self.drop_last
            )
        return batch_indices(
            len(self.examples), self.batch_size, self.seed, epoch, self.shuffle, self.drop_last
        )

    def __len__(self) -> int:
        return len(self.batches(0))

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        epoch = self.cursor.epoch
        batches = self.batches(epoch)
        while self.cursor.epoch == epoch and self.cursor.index < len(batches):
            indices = batches[self.cursor.index]
            self.cursor = DataCursor(epoch, self.cursor.index + 1)
            yield collate([self.examples[i] for i in indices], self.pad_id, **self.collate_kwargs)
        if self.cursor.epoch == epoch:
            self.cursor = DataCursor(epoch + 1, 0)

    def state_dict(self) -> dict[str, int]:
        """The cursor plus what the order depends on (checked again on restore)."""
        return {
            **asdict(self.cursor),
            "seed": self.seed,
            "n_examples": len(self.examples),
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore a cursor; refuses one taken over different data, seed or batch size."""
        for key, mine in (
            ("seed", self.seed),
            ("n_examples", len(self.examples)),
            ("batch_size", self.batch_size),
        ):
            if key in state and state[key] != mine:
                raise ValueError(
                    f"cannot resume the data order: the checkpoint has {key}={state[key]}, "
                    f"this run has {mine} (the batches would differ)"
                )
        self.cursor = DataCursor(int(state["epoch"]), int(state["index"]))
