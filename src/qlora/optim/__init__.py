"""Optimizers for any PyTorch model: 8-bit AdamW and paged AdamW (32- and 8-bit state).

`build_optimizer` maps the trainer's ``optim:`` names to them.
"""

from qlora.optim.adamw import AdamW8bit, PagedAdamW, PagedAdamW8bit
from qlora.optim.build import OPTIMIZERS, OptimizerName, build_optimizer

__all__ = [
    "OPTIMIZERS",
    "AdamW8bit",
    "OptimizerName",
    "PagedAdamW",
    "PagedAdamW8bit",
    "build_optimizer",
]
