"""Hold out evaluation data: a seeded fraction of one file's records, or a separate file.

The split is made on *records*, before tokenization, so the chunks of one long text never
straddle train and eval. It depends only on (number of records, fraction, seed).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TypeVar

__all__ = ["split_eval"]

T = TypeVar("T")


def split_eval(items: Sequence[T], fraction: float, seed: int = 0) -> tuple[list[T], list[T]]:
    """Split ``items`` into (train, eval) with a seeded shuffle.

    ``round(len(items) * fraction)`` items go to eval, at least one when ``fraction > 0``,
    and at least one always stays for training. Both parts keep the items' original order.

    Args:
        items: the records (or examples).
        fraction: share held out, in [0, 1).
        seed: the shuffle seed.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"eval fraction must be in [0, 1), got {fraction}")
    n = len(items)
    n_eval = 0 if fraction == 0 else max(1, round(n * fraction))
    n_eval = min(n_eval, n - 1) if n > 0 else 0
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    train = [item for i, item in enumerate(items) if i not in held]
    held_out = [item for i, item in enumerate(items) if i in held]
    return train, held_out
