"""The trainer's ``optim:`` names, as optimizers."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Literal, get_args

import torch

from qlora.optim.adamw import AdamW8bit, PagedAdamW, PagedAdamW8bit

__all__ = ["OPTIMIZERS", "OptimizerName", "build_optimizer"]

OptimizerName = Literal["adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit"]
OPTIMIZERS: tuple[str, ...] = get_args(OptimizerName)


def build_optimizer(
    name: str,
    params: Iterable[torch.Tensor],
    lr: float,
    weight_decay: float,
    *,
    page_bytes: int = 64 << 20,
    state_dir: str | Path | None = None,
) -> torch.optim.Optimizer:
    """The optimizer ``name`` over ``params``.

    Args:
        name: "adamw" (torch.optim.AdamW), "adamw8bit", "paged_adamw" or "paged_adamw8bit".
        page_bytes, state_dir: paging settings (paged optimizers only; see `PagedAdamW`).
    """
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw8bit":
        return AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    if name == "paged_adamw":
        return PagedAdamW(
            params, lr=lr, weight_decay=weight_decay, page_bytes=page_bytes, state_dir=state_dir
        )
    if name == "paged_adamw8bit":
        return PagedAdamW8bit(
            params, lr=lr, weight_decay=weight_decay, page_bytes=page_bytes, state_dir=state_dir
        )
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
