"""AdamW with 8-bit and/or paged state: `AdamW8bit`, `PagedAdamW`, `PagedAdamW8bit`.

All three are `torch.optim.Optimizer`s (schedulers, ``zero_grad``, param groups work as usual)
built on one loop: each parameter owns a *slot* (its moments, 32- or 8-bit, and a step count;
`qlora.optim.slots`), and a step updates slots slice by slice with `qlora.optim.update`. The
stages of a step live in their own modules: the layout (`slots`), the paged loops (`paging`)
and the state-dict format (`state_io`); this class strings them together.

**Paging.** A paged optimizer keeps every slot in a `StateArena` off the compute device and
cuts the slots into *pages* of at most ``page_bytes`` of state (a large parameter spans
several pages; pages break on 256-element block boundaries). Only the page being updated is
on the compute device:

* CPU parameters: the arena is a memory-mapped file; the update runs in place on the mapping
  and the page is dropped from resident memory right after (``MADV_DONTNEED``), while the next
  page is already being read ahead (``MADV_WILLNEED``). Resident state ≤ one page (+ the
  read-ahead), whatever the model's size.
* GPU parameters: the arena is pinned host memory (or a file). Two device buffers of one page
  each alternate: page i+1 is copied in on a side stream while page i updates on the compute
  stream, and page i is copied back on the side stream once its update finished. Device
  memory for state = two pages.

Results are independent of the page size: the update is element-wise and 8-bit blocks never
straddle a page, so paged and unpaged optimizers agree bit for bit (tested).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from qlora.optim.arena import PAGE, StateArena
from qlora.optim.paging import StagedPages, open_arena, step_in_place
from qlora.optim.slots import (
    Segment,
    Slot,
    allocate_in_arena,
    allocate_on_device,
    arena_offsets,
    make_slots,
    paginate,
)
from qlora.optim.state8bit import MIN_QUANTIZED_NUMEL
from qlora.optim.state_io import export_state, load_slot, saved_param_ids
from qlora.optim.update import CHUNK, Hyper, update_fp32_state, update_quantized_state

__all__ = ["AdamW8bit", "PagedAdamW", "PagedAdamW8bit"]


def _check_hyperparameters(
    lr: float, betas: tuple[float, float], eps: float, weight_decay: float, page_bytes: int
) -> None:
    if not lr >= 0.0:
        raise ValueError(f"invalid learning rate {lr}")
    if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
        raise ValueError(f"invalid betas {betas}: each must be in [0, 1)")
    if not eps >= 0.0 or not weight_decay >= 0.0:
        raise ValueError(f"invalid eps {eps} or weight_decay {weight_decay}")
    if page_bytes < 4 * PAGE:
        raise ValueError(f"page_bytes must be at least {4 * PAGE}, got {page_bytes}")


def _hyper(group: dict[str, Any]) -> Hyper:
    beta1, beta2 = group["betas"]
    return Hyper(float(group["lr"]), beta1, beta2, group["eps"], group["weight_decay"])


class _AdamWFamily(torch.optim.Optimizer):
    """The shared implementation; see the module docstring and the public subclasses."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        bits: int,
        paged: bool,
        page_bytes: int = 64 << 20,
        state_dir: str | Path | None = None,
        staged: bool | None = None,
        min_8bit_size: int = MIN_QUANTIZED_NUMEL,
    ) -> None:
        _check_hyperparameters(lr, betas, eps, weight_decay, page_bytes)
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        self.bits = bits
        self.paged = paged
        self.page_bytes = int(page_bytes)
        self.state_dir = state_dir
        self.staged = staged
        self.min_8bit_size = min_8bit_size
        self._slots: list[Slot] | None = None
        self._pages: list[list[Segment]] = []
        self._arena: StateArena | None = None
        self._scratch: dict[torch.device, torch.Tensor] = {}
        self._staged_pages = StagedPages()

    # ---------------------------------------------------------------- layout
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "_slots", None) is not None:
            raise RuntimeError(
                f"{type(self).__name__}: add parameter groups before the first step or "
                "state_dict call (the state layout is fixed then)"
            )
        super().add_param_group(param_group)

    def _materialize(self) -> list[Slot]:
        """Lay out every parameter's state (once)."""
        if self._slots is not None:
            return self._slots
        slots = make_slots(self.param_groups, self.bits, self.min_8bit_size, type(self).__name__)
        self._slots = slots
        if self.paged:
            self._layout_paged(slots)
        else:
            allocate_on_device(slots)
        return slots

    def _layout_paged(self, slots: list[Slot]) -> None:
        nbytes = arena_offsets(slots)
        devices = {s.param.device for s in slots}
        self._arena, self.staged = open_arena(
            nbytes, devices, self.state_dir, self.staged, type(self).__name__
        )
        allocate_in_arena(slots, self._arena)
        self._pages = paginate(slots, self.page_bytes)

    # ---------------------------------------------------------------- the step
    def _scratch_for(self, device: torch.device) -> torch.Tensor:
        if device not in self._scratch:
            self._scratch[device] = torch.empty(2, CHUNK, dtype=torch.float32, device=device)
        return self._scratch[device]

    def _update(self, seg: Segment, state: list[torch.Tensor], hypers: list[Hyper]) -> None:
        """Update elements [seg.start, seg.end) of the slot's parameter from ``state``
        (the slice's state tensors, wherever they live)."""
        slot = seg.slot
        p = slot.param.detach().view(-1)[seg.start : seg.end]
        grad = slot.param.grad
        assert grad is not None
        g = grad.detach().reshape(-1)[seg.start : seg.end]
        h = hypers[slot.group]
        if slot.quantized:
            scratch = self._scratch_for(p.device)
            update_quantized_state(p, g, *state, slot.step, h, scratch)
        else:
            update_fp32_state(p, g, state[0], state[1], slot.step, h)

    def _advance_steps(self, slots: list[Slot]) -> list[Slot]:
        """The slots with a gradient, their step counts advanced."""
        active = [s for s in slots if s.param.grad is not None]
        for slot in active:
            if slot.param.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            slot.step += 1
        return active

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        slots = self._materialize()
        hypers = [_hyper(group) for group in self.param_groups]
        active = self._advance_steps(slots)

        def update(seg: Segment, state: list[torch.Tensor]) -> None:
            self._update(seg, state, hypers)

        if not self.paged:
            for slot in active:
                update(Segment(slot, 0, slot.numel), slot.tensors)
            return loss
        pages = [[seg for seg in page if seg.slot.param.grad is not None] for page in self._pages]
        pages = [page for page in pages if page]
        if self.staged:
            self._staged_pages.step(pages, self._pages, update, self._arena)
        else:
            assert self._arena is not None
            step_in_place(self._arena, pages, update)
        return loss

    # ---------------------------------------------------------------- state dict
    def state_dict(self) -> dict[str, Any]:
        """torch.optim's layout (see `qlora.optim.state_io`): a 32-bit state dict is
        interchangeable with ``torch.optim.AdamW``'s; 8-bit and 32-bit state dicts load into
        each other."""
        return export_state(self._materialize(), self.param_groups)

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        slots = self._materialize()
        owner = type(self).__name__
        ids = saved_param_ids(state_dict, self.param_groups, owner)
        for saved, group in zip(state_dict["param_groups"], self.param_groups, strict=True):
            group.update({k: v for k, v in saved.items() if k != "params"})
        for slot, saved_id in zip(slots, ids, strict=True):
            entry = state_dict["state"].get(saved_id)
            if entry is None:
                slot.step = 0
                for t in slot.tensors:
                    t.zero_()
                continue
            load_slot(slot, entry, owner)
        self.release_pages()

    # ---------------------------------------------------------------- reporting
    def state_nbytes(self) -> int:
        """Bytes of optimizer state (moments + scales), wherever it lives."""
        return sum(t.numel() * t.element_size() for s in self._materialize() for t in s.tensors)

    def resident_state_bytes(self) -> int:
        """Bytes of state resident in this process's memory now (paged file-backed state:
        measured from the mapping; otherwise all of it)."""
        self._materialize()
        if self._arena is not None and self._arena.file_backed:
            return self._arena.resident_bytes()
        return self.state_nbytes()

    def release_pages(self) -> None:
        """Drop file-backed state from resident memory (e.g. after saving a checkpoint)."""
        if self._arena is not None:
            self._arena.release([(0, self._arena.nbytes)])

    def __repr__(self) -> str:
        extra = f", page_bytes={self.page_bytes}" if self.paged else ""
        return f"{type(self).__name__}(lr={self.defaults['lr']}{extra})"


class AdamW8bit(_AdamWFamily):
    """AdamW with blockwise 8-bit moments (≈2 bytes of state per parameter instead of 8).

    Args:
        params: parameters or parameter groups, as for `torch.optim.AdamW`.
        lr, betas, eps, weight_decay: as `torch.optim.AdamW` (same defaults).
        min_8bit_size: tensors with fewer elements keep fp32 moments (default 4096).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        min_8bit_size: int = MIN_QUANTIZED_NUMEL,
    ) -> None:
        super().__init__(
            params, lr, betas, eps, weight_decay, bits=8, paged=False,
            min_8bit_size=min_8bit_size,
        )  # fmt: skip


class PagedAdamW(_AdamWFamily):
    """AdamW (fp32 moments, results identical to `torch.optim.AdamW`) with its state paged:
    kept off the compute device and brought in ``page_bytes`` at a time.

    Args:
        params, lr, betas, eps, weight_decay: as `torch.optim.AdamW`.
        page_bytes: state bytes per page (default 64 MiB): the most state resident at once.
        state_dir: directory for the memory-mapped state file (CPU parameters: default the
            system temp directory; GPU parameters: default pinned host memory).
        staged: copy pages into a compute buffer instead of updating in place (default: only
            for GPU parameters; True on CPU exercises the GPU code path).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        page_bytes: int = 64 << 20,
        state_dir: str | Path | None = None,
        staged: bool | None = None,
    ) -> None:
        super().__init__(
            params, lr, betas, eps, weight_decay, bits=32, paged=True, page_bytes=page_bytes,
            state_dir=state_dir, staged=staged,
        )  # fmt: skip


class PagedAdamW8bit(_AdamWFamily):
    """`AdamW8bit` with its state paged as in `PagedAdamW` (≈2 bytes per parameter, off the
    compute device)."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        page_bytes: int = 64 << 20,
        state_dir: str | Path | None = None,
        staged: bool | None = None,
        min_8bit_size: int = MIN_QUANTIZED_NUMEL,
    ) -> None:
        super().__init__(
            params, lr, betas, eps, weight_decay, bits=8, paged=True, page_bytes=page_bytes,
            state_dir=state_dir, staged=staged, min_8bit_size=min_8bit_size,
        )  # fmt: skip
