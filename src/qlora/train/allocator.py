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
live memory. The cost is a page fault per 4 KiB page touched in each new mapping, ~1.2 us each
in a VM. With n = 128 KiB nearly every activation is a fresh mapping: on the bench_step
workload (docs/benchmarks.md; 2-core Xeon with AMX, bf16 compute) a QLoRA step took 1.08M
page faults and 3.07 s, against 0.22M and 2.07 s when glibc keeps its heap (but 1.19x the
peak memory, more as the steps go on). So the default is in between: tensors under 8 MiB
(most activations of a small batch) come from the heap, reused within the step without new
faults, the bigger ones are mapped, and with gradient checkpointing (a run that asked for
memory) `trim_heap` hands the heap's free pages back after every optimizer step
(``malloc_trim(0)`` releases free chunks in the middle of the heap too), so nothing freed
stays resident between steps (without checkpointing the step's own activations set the peak
and faulting them in again after a trim costs ~10% of the step): measured 2.28 s at 2201 MiB without
checkpointing and 3.02 s at 1315 MiB with it, against 3.07 s / 1892 MiB and 4.56 s / 975 MiB
at 128 KiB (loss chunk 256 in all four). The hot temporaries (dequantized weights, dropout
buffers, the bf16 input copies, the loss's logits) live in reused buffers
(`qlora.quant.scratch`) whatever the threshold; ``train.malloc_mmap_kb=128`` is the leanest
setting, 0 leaves glibc alone.

This is process-wide allocator configuration (like ``MALLOC_MMAP_THRESHOLD_`` in the
environment, which does the same at start-up): `qlora.train` applies it on the CPU when
``train.malloc_mmap_kb`` > 0 (the default, 8192) and leaves it set. Elsewhere (not glibc, or
CUDA tensors, which PyTorch's caching allocator manages) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

__all__ = ["limit_heap_retention", "trim_heap"]

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


def trim_heap() -> bool:
    """Return the heap's free pages to the system (glibc's ``malloc_trim(0)``, which also
    releases free chunks in the middle of the heap). False where there is no glibc."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
