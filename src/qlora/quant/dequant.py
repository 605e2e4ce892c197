"""`dequantize`: the dispatcher from a `QuantState` to the fastest exact path available.

Paths, all bit-identical to `blockwise.dequantize_reference` (tests compare them):

* CPU: the C kernel in ``qlora/kernels/cpu.c`` (built at install time when a C compiler
  exists; AVX2 register lookup for 4-bit codes, byte tables otherwise, OpenMP over blocks).
* CUDA: the Triton kernel in ``qlora/kernels/triton_dequant.py`` when triton is installed.
* anything else (no compiler, no triton): the PyTorch reference.

A state holding a GGUF file's own blocks (``state.is_gguf``) goes to
`qlora.quant.gguf_blocks.dequantize_blocks` (its C kernel, or its PyTorch reference; both
bit-identical to ``gguf.quants.dequantize``).

`qlora.kernels` decides which kernels run: ``QLORA_DISABLE_KERNELS=1`` (read at every call)
forces the reference path everywhere.
"""

from __future__ import annotations

import torch

from qlora.kernels import c_extension, triton_enabled
from qlora.quant.blockwise import dequantize_absmax, dequantize_reference
from qlora.quant.gguf_blocks import dequantize_blocks
from qlora.quant.state import QuantState

__all__ = ["dequantize"]

_OUT_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def dequantize(
    state: QuantState, dtype: torch.dtype | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The tensor that ``state`` stands for, in ``dtype`` (default: the original dtype).

    Args:
        state: a quantized tensor of shape [*].
        dtype: float32, bfloat16 or float16.
        out: optional preallocated contiguous output [*] of ``dtype`` on the state's device;
            reusing one avoids page-faulting a fresh allocation on every call.
    Returns:
        tensor [state.shape]
    """
    dtype = dtype or state.dtype
    if out is not None and (
        out.dtype != dtype
        or out.numel() != state.numel
        or not out.is_contiguous()
        or out.device != state.device
    ):
        raise ValueError(
            f"out must be a contiguous {dtype} tensor of {state.numel} elements on "
            f"{state.device}; got {out.dtype} {tuple(out.shape)} on {out.device}"
        )
    kernel = c_extension("cpu")
    if state.is_gguf:
        result = dequantize_blocks(state.packed, state.kind, tuple(state.shape), dtype, out=out)
    elif kernel is not None and state.device.type == "cpu" and dtype in _OUT_DTYPES:
        absmax = dequantize_absmax(state).contiguous()
        code = state.code.float().contiguous()
        packed = state.packed.contiguous()
        result = out if out is not None else torch.empty(state.shape, dtype=dtype)
        kernel.dequantize(
            packed.data_ptr(),
            absmax.data_ptr(),
            code.data_ptr(),
            result.data_ptr(),
            state.numel,
            state.blocksize,
            state.bits,
            _OUT_DTYPES[dtype],
            torch.get_num_threads(),
        )
    elif state.device.type == "cuda" and dtype in _OUT_DTYPES and triton_enabled():
        from qlora.kernels.triton_dequant import dequantize_triton

        result = (
            out if out is not None else torch.empty(state.shape, dtype=dtype, device=state.device)
        )
        dequantize_triton(
            state.packed.contiguous(),
            dequantize_absmax(state).float().contiguous(),
            state.code.float().contiguous(),
            result.view(-1),
            state.blocksize,
            state.bits,
        )
    else:
        result = dequantize_reference(state, dtype)
        if out is not None:
            out.view(state.shape).copy_(result)
            result = out
    return result if result.shape == state.shape else result.view(state.shape)
