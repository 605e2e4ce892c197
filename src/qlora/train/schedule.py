"""Learning-rate schedules: linear warmup, then constant (QLoRA's choice), cosine or linear."""

from __future__ import annotations

import math
from collections.abc import Callable

__all__ = ["lr_lambda"]


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """The multiplier of the peak LR after ``step`` optimizer steps (for ``LambdaLR``).

    Warmup rises linearly from 1/(warmup+1) to 1; cosine and linear then decay to 0 at
    ``total_steps``.
    """
    if schedule not in ("constant", "cosine", "linear"):
        raise ValueError(f"unknown schedule {schedule!r}; choose constant, cosine or linear")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress

    return factor
