"""Keep glibc from holding on to freed activation memory during CPU training.

PyTorch's CPU tensors come from ``malloc``. glibc serves a request above its *mmap threshold*
with a fresh ``mmap`` that ``free`` unmaps at once; smaller ones come from the heap, whose
freed pages stay in the process unless they happen to sit at its top. The threshold starts
at 128 KiB but is *dynamic*: each time a mapped block is freed, the threshold rises to that
block's size (up to 32 MiB). A training step frees megabyte-sized activations constantly, so
after the first step nearly every activation is carved out of the heap, the heap grows to the
step's high-water mark plus its holes, and the process's resident memory stays 1.4-2.7x the
live tensors (measured on SmolLM2-135M, docs/memory.md) - memory a user sees as used.

Setting the threshold explicitly (``mallopt(M_MMAP_THRESHOLD, n)``) turns the dynamic
adjustment off: every tensor above n bytes is mapped and unmapped, and resident memory follows
live memory. The cost is a page fault per 4 KiB page touched in each new tensor, ~2 µs each
in a VM: on the bench_step workload (docs/benchmarks.md) a checkpointed QLoRA step took 21.65 s
instead of 18.70 s, for a whole-process peak of 1155 MiB instead of 1695 MiB (2.4x less
without checkpointing). The hot temporaries (dequantized weights, dropout buffers) therefore
live in reused buffers (`qlora.quant.scratch`); ``train.malloc_mmap_kb=0`` trades the memory
back for the speed.

This is process-wide allocator configuration (like ``MALLOC_MMAP_THRESHOLD_`` in the
environment, which does the same at start-up): `qlora.train` applies it on the CPU when
``train.malloc_mmap_kb`` > 0 (the default, 128) and leaves it set. Elsewhere (not glibc, or
CUDA tensors, which PyTorch's caching allocator manages) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

__all__ = ["limit_heap_retention"]

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt  # noqa: B018 - glibc only
    except (OSError, AttributeError):
        return None
    return libc


def limit_heap_retention(threshold_kb: int = 128) -> bool:
    """Serve allocations of ``threshold_kb`` KiB and more with mmap, returned on free.

    Returns:
        True when glibc accepted the setting; False where there is no glibc ``mallopt``.
    """
    if threshold_kb <= 0:
        raise ValueError(f"threshold_kb must be positive, got {threshold_kb}")
    libc = _libc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold_kb) * 1024))
