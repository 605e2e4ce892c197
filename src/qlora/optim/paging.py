"""Paged optimizer steps: bring state in one page at a time, update it, put it back.

Two ways, chosen once per optimizer (`open_arena`):

* **in place** (CPU parameters, file-backed arena): update the mapping directly; drop each
  page from resident memory right after (``MADV_DONTNEED``) while the next one is read ahead
  (``MADV_WILLNEED``). Resident state ≤ one page plus the read-ahead.
* **staged** (GPU parameters; or CPU with ``staged=True``, which exercises the same code):
  two device buffers of one page each alternate. On CUDA, page i+1 is copied in on a side
  stream while page i updates on the compute stream, and page i is copied back on the side
  stream once its update finished. Device memory for state = two pages.

Both call ``update(segment, state)`` with the segment's state tensors wherever they live, so
results do not depend on the way or the page size.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from qlora.optim.arena import StateArena
from qlora.optim.slots import Segment, aligned

__all__ = ["StagedPages", "Update", "open_arena", "step_in_place"]

Update = Callable[[Segment, list[torch.Tensor]], None]
_DEVICE_ALIGN = 256  # bytes; alignment of each piece in a device page buffer


def open_arena(
    nbytes: int,
    devices: set[torch.device],
    state_dir: str | Path | None,
    staged: bool | None,
    owner: str,
) -> tuple[StateArena, bool]:
    """The arena for ``nbytes`` of state and whether steps are staged.

    Default: CPU parameters update a memory-mapped file (the system temp directory unless
    ``state_dir``) in place; GPU parameters stage pages from pinned host memory (or a file
    in ``state_dir``).
    """
    on_cpu = devices == {torch.device("cpu")}
    staged = (not on_cpu) if staged is None else staged
    directory = state_dir
    if directory is None and on_cpu and not staged:
        directory = tempfile.gettempdir()
    if staged and len(devices) > 1:
        raise ValueError(f"{owner}: all parameters must be on one device, got {devices}")
    arena = StateArena(nbytes, directory, pin=staged and not on_cpu and directory is None)
    return arena, staged


def step_in_place(arena: StateArena, pages: list[list[Segment]], update: Update) -> None:
    """Update each page on the arena itself, reading the next ahead and dropping the last."""
    for i, page in enumerate(pages):
        if i + 1 < len(pages):
            arena.prefetch([r for seg in pages[i + 1] for r in seg.byte_ranges()])
        for seg in page:
            state = [t[s:e] for t, s, e in seg.pieces()]
            update(seg, state)
        arena.release([r for seg in page for r in seg.byte_ranges()])
    arena.release([(0, arena.nbytes)])  # whatever fault-around mapped back in


def _page_nbytes(page: list[Segment]) -> int:
    return sum(
        aligned((e - s) * t.element_size(), _DEVICE_ALIGN)
        for seg in page
        for t, s, e in seg.pieces()
    )


def _device_views(page: list[Segment], buffer: torch.Tensor) -> list[list[torch.Tensor]]:
    """Per segment, typed views of ``buffer`` (uint8) for each of its state tensors."""
    views, offset = [], 0
    for seg in page:
        pieces = []
        for t, s, e in seg.pieces():
            nbytes = (e - s) * t.element_size()
            pieces.append(buffer[offset : offset + nbytes].view(t.dtype))
            offset += aligned(nbytes, _DEVICE_ALIGN)
        views.append(pieces)
    return views


def _copy_in(page: list[Segment], views: list[list[torch.Tensor]], non_blocking: bool) -> None:
    for seg, pieces in zip(page, views, strict=True):
        for dst, (t, s, e) in zip(pieces, seg.pieces(), strict=True):
            dst.copy_(t[s:e], non_blocking=non_blocking)


def _copy_out(page: list[Segment], views: list[list[torch.Tensor]], non_blocking: bool) -> None:
    for seg, pieces in zip(page, views, strict=True):
        for src, (t, s, e) in zip(pieces, seg.pieces(), strict=True):
            t[s:e].copy_(src, non_blocking=non_blocking)


def _update_page(page: list[Segment], views: list[list[torch.Tensor]], update: Update) -> None:
    for seg, pieces in zip(page, views, strict=True):
        update(seg, pieces)


class StagedPages:
    """The two page buffers on the compute device (and a copy stream on CUDA), made at the
    first step at the size of the largest page."""

    def __init__(self) -> None:
        self._buffers: list[torch.Tensor] = []
        self._stream: Any = None

    def _ensure_buffers(self, device: torch.device, all_pages: list[list[Segment]]) -> None:
        if self._buffers:
            return
        need = max(_page_nbytes(page) for page in all_pages)
        self._buffers = [torch.empty(need, dtype=torch.uint8, device=device) for _ in "ab"]
        if device.type == "cuda":
            self._stream = torch.cuda.Stream(device)

    def step(
        self,
        pages: list[list[Segment]],
        all_pages: list[list[Segment]],
        update: Update,
        arena: StateArena | None,
    ) -> None:
        """Update ``pages`` (those with gradients; ``all_pages`` sizes the buffers)."""
        device = pages[0][0].slot.param.device if pages else torch.device("cpu")
        self._ensure_buffers(device, all_pages)
        views = [_device_views(page, self._buffers[i % 2]) for i, page in enumerate(pages)]
        if device.type == "cuda":
            self._step_cuda(pages, views, update, device)
        else:
            _step_host(pages, views, update)
        if arena is not None:  # a file-backed arena: drop what the copies read in
            arena.release([(0, arena.nbytes)])

    def _step_cuda(
        self,
        pages: list[list[Segment]],
        views: list[list[list[torch.Tensor]]],
        update: Update,
        device: torch.device,
    ) -> None:
        """Copy page i+1 in on the side stream while page i updates on the compute stream."""
        copy_stream = self._stream
        compute_stream = torch.cuda.current_stream(device)
        ready: list[Any] = [None] * len(pages)

        def stage_in(i: int) -> None:
            with torch.cuda.stream(copy_stream):
                _copy_in(pages[i], views[i], non_blocking=True)
                ready[i] = torch.cuda.Event()
                ready[i].record(copy_stream)

        if pages:
            stage_in(0)
        for i, page in enumerate(pages):
            if i + 1 < len(pages):  # prefetch the next page into the other buffer
                stage_in(i + 1)
            compute_stream.wait_event(ready[i])
            _update_page(page, views[i], update)
            done = torch.cuda.Event()
            done.record(compute_stream)
            copy_stream.wait_event(done)
            with torch.cuda.stream(copy_stream):
                _copy_out(page, views[i], non_blocking=True)
        copy_stream.synchronize()


def _step_host(
    pages: list[list[Segment]], views: list[list[list[torch.Tensor]]], update: Update
) -> None:
    """The staged order without streams: copy in the next page, update, copy back."""
    if pages:
        _copy_in(pages[0], views[0], non_blocking=False)
    for i, page in enumerate(pages):
        if i + 1 < len(pages):
            _copy_in(pages[i + 1], views[i + 1], non_blocking=False)
        _update_page(page, views[i], update)
        _copy_out(page, views[i], non_blocking=False)
