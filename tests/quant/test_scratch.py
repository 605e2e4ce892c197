"""The per-thread dequantize scratch buffer: same values, reused memory, one per thread."""

from __future__ import annotations

import threading

import torch

from qlora.nn.qlinear import dequantize_for_matmul
from qlora.quant import dequantize_reference, quantize
from qlora.quant.scratch import dequantize_scratch


def test_values_equal_the_reference_and_memory_is_reused() -> None:
    big = quantize(torch.randn(96, 64), "nf4", 64)
    small = quantize(torch.randn(32, 64), "nf4", 64)
    first = dequantize_for_matmul(big, torch.float32)
    assert torch.equal(first, dequantize_reference(big, torch.float32))
    pointer = first.data_ptr()
    second = dequantize_for_matmul(small, torch.float32)  # fits in the grown buffer
    assert second.data_ptr() == pointer
    assert torch.equal(second, dequantize_reference(small, torch.float32))


def test_threads_get_their_own_buffer() -> None:
    pointers: list[int] = []

    def grab() -> None:
        pointers.append(dequantize_scratch(torch.Size([128, 128]), torch.float32).data_ptr())

    grab()
    thread = threading.Thread(target=grab)
    thread.start()
    thread.join()
    assert pointers[0] != pointers[1]
