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

__all__ = ["dequantize_scratch", "release_scratch", "rounded_copy", "scratch"]

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


def rounded_copy(
    rows: torch.Tensor, dtype: torch.dtype, slot: str, reuse: bool = False
) -> torch.Tensor:
    """``rows`` converted to ``dtype`` in this thread's ``slot`` buffer (see `scratch`).

    With ``reuse``, the copy the previous call made of the same rows - the same storage,
    shape, strides and version counter; the rows are held meanwhile, so their memory cannot
    be handed to another tensor under the same address - is returned without copying again
    (q, k and v read one normed hidden state). Inference tensors have no version counter:
    they are always copied. A copy into the slot without ``reuse`` forgets the held one.
    """
    buffer = scratch(rows.shape, dtype, slot)
    last = getattr(_LOCAL, "last_copy", None)
    if reuse and not rows.is_inference():
        key = (slot, rows.data_ptr(), tuple(rows.shape), rows.stride(), rows._version, dtype)
        if last is not None and last[0] == key:
            return buffer
        _LOCAL.last_copy = (key, rows)
    elif last is not None and last[0][0] == slot:
        _LOCAL.last_copy = None
    return buffer.copy_(rows)


def release_scratch() -> None:
    """Drop this thread's buffers and the rows `rounded_copy` holds (the end of a training
    run: the loss's logits buffers alone are ~300 MB for a 49k vocabulary)."""
    _LOCAL.buffers = {}
    _LOCAL.last_copy = None


def dequantize_scratch(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """`scratch` for a dequantized weight."""
    return scratch(shape, dtype, "weight")
