"""Triton kernel: blockwise k-bit dequantize on CUDA (any width: 2, 4 or 8 bits per code).

One program handles ``ELEMENTS`` consecutive outputs of the flattened tensor:

    byte  = packed[i // per_byte]                       per_byte = 8 // bits
    index = (byte >> (bits · (per_byte - 1 - i % per_byte))) & (2^bits - 1)
    out[i] = round_to_out_dtype(code[index] · absmax[i // blocksize])

exactly the reference's arithmetic (one float32 multiply, then one rounding), so results are
bit-identical to `dequantize_reference`. The kernel is memory-bound: it reads bits/8 bytes and
writes 2–4 bytes per element, and the 16-entry (or 256-entry) codebook stays in L1.

It runs on a GPU, and - for tests - on the CPU under Triton's interpreter
(``TRITON_INTERPRET=1``), which executes the same program with NumPy.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is optional
    triton = None
    tl = None

__all__ = ["available", "dequantize_triton"]

_ELEMENTS = 1024


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _dequant_kernel(
        packed_ptr,
        absmax_ptr,
        code_ptr,
        out_ptr,
        n_elements,
        BLOCKSIZE: tl.constexpr,
        BITS: tl.constexpr,
        ELEMENTS: tl.constexpr,
        OUT_BF16: tl.constexpr,
    ):
        per_byte: tl.constexpr = 8 // BITS
        offsets = tl.program_id(0).to(tl.int64) * ELEMENTS + tl.arange(0, ELEMENTS)
        inside = offsets < n_elements
        byte = tl.load(packed_ptr + offsets // per_byte, mask=inside, other=0).to(tl.int32)
        shift = (BITS * (per_byte - 1 - offsets % per_byte)).to(tl.int32)
        index = (byte >> shift) & ((1 << BITS) - 1)
        value = tl.load(code_ptr + index, mask=inside, other=0.0)
        scale = tl.load(absmax_ptr + offsets // BLOCKSIZE, mask=inside, other=0.0)
        result = value * scale
        if OUT_BF16:
            # float32 -> bfloat16 with round-to-nearest-even done on the bits, as the reference
            # (torch) does; Triton's interpreter would truncate in a plain cast.
            bits = result.to(tl.int32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            rounded = (bits >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
        else:
            rounded = result.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + offsets, rounded, mask=inside)


def dequantize_triton(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    out: torch.Tensor,
    blocksize: int,
    bits: int,
) -> torch.Tensor:
    """Launch the kernel.

    Args:
        packed: uint8 [ceil(n · bits / 8)] codes.
        absmax: float32 [ceil(n / blocksize)] per-block scales (already un-double-quantized).
        code: float32 [2^bits] codebook.
        out: contiguous float32/bfloat16/float16 [n] output, written in place.
    Returns:
        ``out``
    """
    if triton is None:
        raise RuntimeError("triton is not installed; pip install 'qlora[triton]'")
    n = out.numel()
    grid = (triton.cdiv(n, _ELEMENTS),)
    _dequant_kernel[grid](
        packed,
        absmax,
        code,
        out,
        n,
        BLOCKSIZE=blocksize,
        BITS=bits,
        ELEMENTS=_ELEMENTS,
        OUT_BF16=out.dtype == torch.bfloat16,
    )
    return out
