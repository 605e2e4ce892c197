"""A per-thread scratch buffer for weights dequantized on the fly (CPU).

`QuantLinear` and the fused LoRA layer dequantize their 4-bit weight for one matmul and drop
it right after. Allocating that [out, in] float32 tensor afresh on every call costs more than
the dequantization itself where each fresh allocation is new memory the kernel must fault in:
glibc serves large blocks with a fresh ``mmap`` (always so with `limit_heap_retention`), and
a page fault per 4 KiB costs ~1-2 µs in a VM - 3.5 MB of weight, ~7 ms to fault, against
~1 ms to dequantize into memory already mapped. So the weight goes into one reusable buffer
per thread and dtype, grown to the largest weight seen: the memory of one dequantized layer,
which the transient tensor took anyway.

Safe because the buffer's contents live only between the dequantize and the matmul that
reads them, inside one autograd function call, on one thread; nothing keeps a reference.
The buffer is thread-local, so concurrent forwards on different threads do not share it.
"""

from __future__ import annotations

import threading

import torch

__all__ = ["dequantize_scratch", "scratch"]

_LOCAL = threading.local()


def scratch(shape: torch.Size | tuple[int, ...], dtype: torch.dtype, slot: str) -> torch.Tensor:
    """A contiguous CPU tensor of ``shape`` and ``dtype``, reused by later calls on this thread.

    ``slot`` names the use ("weight", "dropout", ...): tensors of different slots never share
    memory, so one of each can be alive at once. Its contents are overwritten by the next call
    with the same slot: use it and drop it before that.
    """
    buffers: dict[tuple[str, torch.dtype], torch.Tensor] = getattr(_LOCAL, "buffers", None) or {}
    _LOCAL.buffers = buffers
    numel = 1
    for size in shape:
        numel *= int(size)
    buffer = buffers.get((slot, dtype))
    if buffer is None or buffer.numel() < numel:
        buffer = torch.empty(numel, dtype=dtype)
        buffers[(slot, dtype)] = buffer
    return buffer[:numel].view(shape)


def dequantize_scratch(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """`scratch` for a dequantized weight."""
    return scratch(shape, dtype, "weight")
