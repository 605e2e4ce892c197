"""The layout of AdamW state: one *slot* per parameter, cut into *segments* and *pages*.

A slot holds a parameter's two moments (float32, or uint8 codes plus one float32 absmax per
256 values) as flat tensors, and its step count. A paged optimizer places every slot in one
`StateArena` (byte offsets aligned to the OS page) and groups slot slices (segments) into
pages of at most ``page_bytes`` of state; segments break on 256-element block boundaries, so
an 8-bit block never straddles two pages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from qlora.optim.arena import PAGE, StateArena
from qlora.optim.state8bit import BLOCK, nblocks

__all__ = [
    "Segment",
    "Slot",
    "aligned",
    "allocate_in_arena",
    "allocate_on_device",
    "arena_offsets",
    "make_slots",
    "paginate",
    "state_shapes",
]


@dataclass
class Slot:
    """One parameter's optimizer state (flat tensors) and where it sits in the arena."""

    param: torch.Tensor
    index: int  # the parameter's position in the state dict
    group: int
    quantized: bool
    tensors: list[torch.Tensor]  # exp_avg, exp_avg_sq[, absmax_m, absmax_v] (flat)
    offsets: list[int] = field(default_factory=list)  # byte offsets in the arena (paged)
    step: int = 0

    @property
    def numel(self) -> int:
        return self.param.numel()

    def bytes_per_element(self) -> float:
        return 2 + 8 / BLOCK if self.quantized else 8


@dataclass(frozen=True)
class Segment:
    """Elements [start, end) of one slot: the unit a page is made of."""

    slot: Slot
    start: int
    end: int

    def pieces(self) -> list[tuple[torch.Tensor, int, int]]:
        """(state tensor, first element, last element) for each state tensor of the slice."""
        bs, be = self.start // BLOCK, -(-self.end // BLOCK)
        spans = [(self.start, self.end)] * 2 + [(bs, be)] * 2
        return [(t, s, e) for t, (s, e) in zip(self.slot.tensors, spans, strict=False)]

    def byte_ranges(self) -> list[tuple[int, int]]:
        return [
            (off + s * t.element_size(), off + e * t.element_size())
            for (t, s, e), off in zip(self.pieces(), self.slot.offsets, strict=True)
        ]


def aligned(nbytes: int, align: int) -> int:
    return -(-nbytes // align) * align


def state_shapes(slot: Slot) -> list[tuple[int, torch.dtype]]:
    """(elements, dtype) of each of the slot's state tensors."""
    n = slot.numel
    if not slot.quantized:
        return [(n, torch.float32), (n, torch.float32)]
    return [(n, torch.uint8), (n, torch.uint8)] + [(nblocks(n), torch.float32)] * 2


def make_slots(
    param_groups: list[dict[str, Any]], bits: int, min_8bit_size: int, owner: str
) -> list[Slot]:
    """One slot per parameter, in state-dict order, without state tensors yet.

    Raises:
        ValueError: a parameter is not contiguous (its flat views would not alias it).
    """
    slots: list[Slot] = []
    for g, group in enumerate(param_groups):
        for p in group["params"]:
            index = len(slots)
            if not p.is_contiguous():
                raise ValueError(
                    f"{owner} needs contiguous parameters; parameter {index} "
                    f"(shape {tuple(p.shape)}) is not: call .contiguous() on it first"
                )
            quantized = bits == 8 and p.numel() >= min_8bit_size
            slots.append(Slot(p, index, g, quantized, []))
    return slots


def allocate_on_device(slots: list[Slot]) -> None:
    """Unpaged state: zeroed tensors next to each parameter."""
    for slot in slots:
        device = slot.param.device
        slot.tensors = [
            torch.zeros(n, dtype=dtype, device=device) for n, dtype in state_shapes(slot)
        ]


def arena_offsets(slots: list[Slot]) -> int:
    """Give every state tensor a page-aligned byte offset; returns the arena's size."""
    offset = 0
    for slot in slots:
        for n, dtype in state_shapes(slot):
            slot.offsets.append(offset)
            offset += aligned(n * torch.empty(0, dtype=dtype).element_size(), PAGE)
    return offset


def allocate_in_arena(slots: list[Slot], arena: StateArena) -> None:
    """Paged state: each slot's tensors are views of the arena at its offsets."""
    for slot in slots:
        slot.tensors = [
            arena.view(off, n, dtype)
            for off, (n, dtype) in zip(slot.offsets, state_shapes(slot), strict=True)
        ]


def paginate(slots: list[Slot], page_bytes: int) -> list[list[Segment]]:
    """Consecutive segments grouped into pages of at most ``page_bytes`` of state (a segment
    alone may reach it; a page never splits an 8-bit block)."""
    pages: list[list[Segment]] = []
    page: list[Segment] = []
    used: float = 0
    for slot in slots:
        per_element = slot.bytes_per_element()
        most = max(BLOCK, int(page_bytes // per_element) // BLOCK * BLOCK)
        for start in range(0, slot.numel, most):
            seg = Segment(slot, start, min(slot.numel, start + most))
            size = (seg.end - seg.start) * per_element
            if page and used + size > page_bytes:
                pages.append(page)
                page, used = [], 0
            page.append(seg)
            used += size
    if page:
        pages.append(page)
    return pages
