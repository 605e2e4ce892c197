"""AdamW with 8-bit and/or paged state: `AdamW8bit`, `PagedAdamW`, `PagedAdamW8bit`.

All three are `torch.optim.Optimizer`s (schedulers, ``zero_grad``, param groups work as usual)
built on one loop: each parameter owns a *slot* (its moments, 32- or 8-bit, and a step count),
and a step updates slots slice by slice with `qlora.optim.update`.

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

import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qlora.optim.arena import PAGE, StateArena
from qlora.optim.state8bit import (
    BLOCK,
    MIN_QUANTIZED_NUMEL,
    dequantize_state,
    nblocks,
    quantize_state,
)
from qlora.optim.update import CHUNK, Hyper, update_fp32_state, update_quantized_state

__all__ = ["AdamW8bit", "PagedAdamW", "PagedAdamW8bit"]

_DEVICE_ALIGN = 256  # bytes; alignment of each piece in a device page buffer
_STATE_KEYS = ("exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax")


@dataclass
class _Slot:
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
class _Segment:
    """Elements [start, end) of one slot: the unit a page is made of."""

    slot: _Slot
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


def _aligned(nbytes: int, align: int) -> int:
    return -(-nbytes // align) * align


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
        if not lr >= 0.0:
            raise ValueError(f"invalid learning rate {lr}")
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"invalid betas {betas}: each must be in [0, 1)")
        if not eps >= 0.0 or not weight_decay >= 0.0:
            raise ValueError(f"invalid eps {eps} or weight_decay {weight_decay}")
        if page_bytes < 4 * PAGE:
            raise ValueError(f"page_bytes must be at least {4 * PAGE}, got {page_bytes}")
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        self.bits = bits
        self.paged = paged
        self.page_bytes = int(page_bytes)
        self.state_dir = state_dir
        self.staged = staged
        self.min_8bit_size = min_8bit_size
        self._slots: list[_Slot] | None = None
        self._pages: list[list[_Segment]] = []
        self._arena: StateArena | None = None
        self._scratch: dict[torch.device, torch.Tensor] = {}
        self._buffers: list[torch.Tensor] = []
        self._stream: Any = None

    # ---------------------------------------------------------------- layout
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "_slots", None) is not None:
            raise RuntimeError(
                f"{type(self).__name__}: add parameter groups before the first step or "
                "state_dict call (the state layout is fixed then)"
            )
        super().add_param_group(param_group)

    def _materialize(self) -> list[_Slot]:
        """Lay out every parameter's state (once)."""
        if self._slots is not None:
            return self._slots
        slots: list[_Slot] = []
        index = 0
        for g, group in enumerate(self.param_groups):
            for p in group["params"]:
                if not p.is_contiguous():
                    raise ValueError(
                        f"{type(self).__name__} needs contiguous parameters; parameter {index} "
                        f"(shape {tuple(p.shape)}) is not: call .contiguous() on it first"
                    )
                quantized = self.bits == 8 and p.numel() >= self.min_8bit_size
                slots.append(_Slot(p, index, g, quantized, []))
                index += 1
        self._slots = slots
        if self.paged:
            self._layout_paged(slots)
        else:
            for slot in slots:
                device = slot.param.device
                slot.tensors = [
                    torch.zeros(n, dtype=dtype, device=device) for n, dtype in self._shapes(slot)
                ]
        return slots

    @staticmethod
    def _shapes(slot: _Slot) -> list[tuple[int, torch.dtype]]:
        n = slot.numel
        if not slot.quantized:
            return [(n, torch.float32), (n, torch.float32)]
        return [(n, torch.uint8), (n, torch.uint8)] + [(nblocks(n), torch.float32)] * 2

    def _layout_paged(self, slots: list[_Slot]) -> None:
        offset = 0
        for slot in slots:
            for n, dtype in self._shapes(slot):
                slot.offsets.append(offset)
                offset += _aligned(n * torch.empty(0, dtype=dtype).element_size(), PAGE)
        devices = {s.param.device for s in slots}
        on_cpu = devices == {torch.device("cpu")}
        staged = (not on_cpu) if self.staged is None else self.staged
        directory = self.state_dir
        if directory is None and on_cpu and not staged:
            directory = tempfile.gettempdir()
        if staged and len(devices) > 1:
            raise ValueError(
                f"{type(self).__name__}: all parameters must be on one device, got {devices}"
            )
        self.staged = staged
        self._arena = StateArena(offset, directory, pin=staged and not on_cpu and directory is None)
        for slot in slots:
            slot.tensors = [
                self._arena.view(off, n, dtype)
                for off, (n, dtype) in zip(slot.offsets, self._shapes(slot), strict=True)
            ]
        # pages: consecutive segments with at most page_bytes of state
        self._pages, page, used = [], [], 0
        for slot in slots:
            per_element = slot.bytes_per_element()
            most = max(BLOCK, int(self.page_bytes // per_element) // BLOCK * BLOCK)
            for start in range(0, slot.numel, most):
                seg = _Segment(slot, start, min(slot.numel, start + most))
                size = (seg.end - seg.start) * per_element
                if page and used + size > self.page_bytes:
                    self._pages.append(page)
                    page, used = [], 0
                page.append(seg)
                used += size
        if page:
            self._pages.append(page)

    # ---------------------------------------------------------------- the step
    def _hyper(self, group: dict[str, Any]) -> Hyper:
        beta1, beta2 = group["betas"]
        return Hyper(float(group["lr"]), beta1, beta2, group["eps"], group["weight_decay"])

    def _scratch_for(self, device: torch.device) -> torch.Tensor:
        if device not in self._scratch:
            self._scratch[device] = torch.empty(2, CHUNK, dtype=torch.float32, device=device)
        return self._scratch[device]

    def _update(self, seg: _Segment, state: list[torch.Tensor], hypers: list[Hyper]) -> None:
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

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        slots = self._materialize()
        hypers = [self._hyper(group) for group in self.param_groups]
        active = [s for s in slots if s.param.grad is not None]
        for slot in active:
            if slot.param.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            slot.step += 1
        if not self.paged:
            for slot in active:
                seg = _Segment(slot, 0, slot.numel)
                self._update(seg, slot.tensors, hypers)
            return loss
        pages = [[seg for seg in page if seg.slot.param.grad is not None] for page in self._pages]
        pages = [page for page in pages if page]
        if self.staged:
            self._step_staged(pages, hypers)
        else:
            self._step_in_place(pages, hypers)
        return loss

    def _step_in_place(self, pages: list[list[_Segment]], hypers: list[Hyper]) -> None:
        arena = self._arena
        assert arena is not None
        for i, page in enumerate(pages):
            if i + 1 < len(pages):
                arena.prefetch([r for seg in pages[i + 1] for r in seg.byte_ranges()])
            for seg in page:
                state = [t[s:e] for t, s, e in seg.pieces()]
                self._update(seg, state, hypers)
            arena.release([r for seg in page for r in seg.byte_ranges()])
        arena.release([(0, arena.nbytes)])  # whatever fault-around mapped back in

    def _device_views(self, page: list[_Segment], buffer: torch.Tensor) -> list[list[torch.Tensor]]:
        views, offset = [], 0
        for seg in page:
            pieces = []
            for t, s, e in seg.pieces():
                nbytes = (e - s) * t.element_size()
                pieces.append(buffer[offset : offset + nbytes].view(t.dtype))
                offset += _aligned(nbytes, _DEVICE_ALIGN)
            views.append(pieces)
        return views

    def _step_staged(self, pages: list[list[_Segment]], hypers: list[Hyper]) -> None:
        device = pages[0][0].slot.param.device if pages else torch.device("cpu")
        if not self._buffers:
            need = max(
                sum(
                    _aligned((e - s) * t.element_size(), _DEVICE_ALIGN)
                    for seg in page
                    for t, s, e in seg.pieces()
                )
                for page in self._pages
            )
            self._buffers = [torch.empty(need, dtype=torch.uint8, device=device) for _ in "ab"]
            if device.type == "cuda":
                self._stream = torch.cuda.Stream(device)
        cuda = device.type == "cuda"
        copy_stream = self._stream
        compute_stream = torch.cuda.current_stream(device) if cuda else None

        def copy_in(page: list[_Segment], views: list[list[torch.Tensor]]) -> Any:
            for seg, pieces in zip(page, views, strict=True):
                for dst, (t, s, e) in zip(pieces, seg.pieces(), strict=True):
                    dst.copy_(t[s:e], non_blocking=cuda)
            return torch.cuda.Event() if cuda else None

        views = [self._device_views(page, self._buffers[i % 2]) for i, page in enumerate(pages)]
        ready: list[Any] = [None] * len(pages)
        if cuda:
            with torch.cuda.stream(copy_stream):
                ready[0] = copy_in(pages[0], views[0]) if pages else None
                if ready[0] is not None:
                    ready[0].record(copy_stream)
        elif pages:
            copy_in(pages[0], views[0])
        for i, page in enumerate(pages):
            if i + 1 < len(pages):  # prefetch the next page into the other buffer
                if cuda:
                    with torch.cuda.stream(copy_stream):
                        ready[i + 1] = copy_in(pages[i + 1], views[i + 1])
                        ready[i + 1].record(copy_stream)
                else:
                    copy_in(pages[i + 1], views[i + 1])
            if cuda:
                compute_stream.wait_event(ready[i])
            for seg, pieces in zip(page, views[i], strict=True):
                self._update(seg, pieces, hypers)
            if cuda:
                done = torch.cuda.Event()
                done.record(compute_stream)
                copy_stream.wait_event(done)
                with torch.cuda.stream(copy_stream):
                    self._copy_out(page, views[i], non_blocking=True)
            else:
                self._copy_out(page, views[i], non_blocking=False)
        if cuda:
            copy_stream.synchronize()
        if self._arena is not None:  # a file-backed arena: drop what the copies read in
            self._arena.release([(0, self._arena.nbytes)])

    @staticmethod
    def _copy_out(
        page: list[_Segment], views: list[list[torch.Tensor]], non_blocking: bool
    ) -> None:
        for seg, pieces in zip(page, views, strict=True):
            for src, (t, s, e) in zip(pieces, seg.pieces(), strict=True):
                t[s:e].copy_(src, non_blocking=non_blocking)

    # ---------------------------------------------------------------- state dict
    def state_dict(self) -> dict[str, Any]:
        """torch.optim's layout: ``{"state": {index: {...}}, "param_groups": [...]}``.

        Per parameter: ``step`` and ``exp_avg`` / ``exp_avg_sq`` shaped like the parameter
        (float32, or uint8 codes plus ``exp_avg_absmax`` / ``exp_avg_sq_absmax`` when 8-bit).
        A 32-bit state dict is interchangeable with ``torch.optim.AdamW``'s; 8-bit and 32-bit
        state dicts load into each other (requantized or dequantized).
        """
        slots = self._materialize()
        state: dict[int, dict[str, Any]] = {}
        for slot in slots:
            if slot.step == 0:
                continue
            entry: dict[str, Any] = {"step": torch.tensor(float(slot.step))}
            for key, t in zip(_STATE_KEYS, slot.tensors, strict=False):
                entry[key] = t.view(slot.param.shape) if key in _STATE_KEYS[:2] else t
            state[slot.index] = entry
        groups, start = [], 0
        for group in self.param_groups:
            saved = {k: v for k, v in group.items() if k != "params"}
            saved["params"] = list(range(start, start + len(group["params"])))
            start += len(group["params"])
            groups.append(saved)
        return {"state": state, "param_groups": groups}

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        slots = self._materialize()
        groups = state_dict.get("param_groups")
        if not isinstance(groups, list) or len(groups) != len(self.param_groups):
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: the saved state has "
                f"{len(groups) if isinstance(groups, list) else 'no'} parameter groups, this "
                f"optimizer {len(self.param_groups)}"
            )
        for saved, group in zip(groups, self.param_groups, strict=True):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"{type(self).__name__}.load_state_dict: a saved group has "
                    f"{len(saved['params'])} parameters, this optimizer's "
                    f"{len(group['params'])}: the model or its adapters changed"
                )
        ids = [i for saved in groups for i in saved["params"]]
        for saved, group in zip(groups, self.param_groups, strict=True):
            group.update({k: v for k, v in saved.items() if k != "params"})
        for slot, saved_id in zip(slots, ids, strict=True):
            entry = state_dict["state"].get(saved_id)
            if entry is None:
                slot.step = 0
                for t in slot.tensors:
                    t.zero_()
                continue
            self._load_slot(slot, entry)
        if self._arena is not None:
            self._arena.release([(0, self._arena.nbytes)])

    def _load_slot(self, slot: _Slot, entry: dict[str, Any]) -> None:
        m, v = entry.get("exp_avg"), entry.get("exp_avg_sq")
        if m is None or v is None or m.numel() != slot.numel or v.numel() != slot.numel:
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: parameter {slot.index} (shape "
                f"{tuple(slot.param.shape)}) has no matching exp_avg/exp_avg_sq in the saved "
                "state"
            )
        slot.step = int(float(entry["step"]))
        saved_8bit = m.dtype == torch.uint8
        absmax = (entry.get("exp_avg_absmax"), entry.get("exp_avg_sq_absmax"))
        if saved_8bit and (absmax[0] is None or absmax[1] is None):
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: parameter {slot.index}: 8-bit state "
                "without its absmax scales"
            )
        m, v = m.reshape(-1), v.reshape(-1)
        if saved_8bit == slot.quantized:  # same format: copy as is
            sources = [m, v, *absmax] if saved_8bit else [m, v]
            for dst, src in zip(slot.tensors, sources, strict=True):
                dst.copy_(src)
            return
        for start in range(0, slot.numel, CHUNK):  # convert chunk by chunk
            end = min(slot.numel, start + CHUNK)
            bs, be = start // BLOCK, -(-end // BLOCK)
            for which, src in enumerate((m, v)):
                signed = which == 0
                if saved_8bit:
                    wide = torch.empty(end - start, dtype=torch.float32)
                    dequantize_state(
                        src[start:end].contiguous(), absmax[which][bs:be].float().contiguous(),
                        signed, wide,
                    )  # fmt: skip
                    slot.tensors[which][start:end].copy_(wide)
                else:
                    wide = src[start:end].float().cpu().contiguous()
                    codes = torch.empty(end - start, dtype=torch.uint8)
                    scales = torch.empty(be - bs, dtype=torch.float32)
                    quantize_state(wide, signed, codes, scales)
                    slot.tensors[which][start:end].copy_(codes)
                    slot.tensors[2 + which][bs:be].copy_(scales)

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
