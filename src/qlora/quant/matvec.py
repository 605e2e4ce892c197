"""`quantized_matmul_few`: x @ deq(W)ᵀ for few rows (decoding) without a dequantized copy.

Dequantize-then-matmul writes a float32 [out, in] copy of W and reads it back: for a 4-bit
weight that is 16x the bytes of the codes. For few input rows (decode, small batches) the
matmul is memory-bound, so the C kernel in ``qlora/kernels/matvec.c`` instead decodes each
row of W block by block (``code[index] * absmax[block]``, in L1) and dots it with the M input
rows in float32 (FMA), reading the codes once. Above ``MATVEC_MAX_ROWS`` rows the matmul is
compute-bound and dequantize-then-matmul (a tuned GEMM) wins again.

The reference is ``x @ dequantize(state, torch.float32).t()``. The kernel forms every weight
exactly as the reference does (one float32 product) and only sums in another order, except
its AVX-512 4-bit path for up to 4 rows, which multiplies each block scale onto a partial sum
of 8 products (s * sum c x for sum s * c * x); either way results agree to float32 rounding:
tests/quant/test_matvec.py asserts ``|ours - reference| <= MATVEC_RTOL * (|x| @ |W|ᵀ)``
element-wise.

The kernel runs when `matvec_applies` says so (CPU tensors, a codebook kind - nf4, fp4, nf2,
int8 - with or without double quantization, ``in % blocksize == 0``, at most
``MATVEC_MAX_ROWS`` rows, the extension built and not disabled by ``QLORA_DISABLE_KERNELS``);
otherwise the reference runs.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch

from qlora.kernels import c_extension
from qlora.quant.blockwise import dequantize_absmax
from qlora.quant.dequant import dequantize
from qlora.quant.state import QuantState

__all__ = ["MATVEC_MAX_ROWS", "MATVEC_RTOL", "matvec_applies", "quantized_matmul_few"]

# Rows (tokens) up to which the fused kernel is used. Measured with benchmarks/bench_matvec.py
# on a 2-core AVX-512 EPYC (Zen 4), 1 thread, nf4 and int8, the default model's shapes and
# 4096x4096: the kernel beat dequantize-then-matmul at every M <= 64 (1.6x or more) and still
# at 128 (1.1-1.8x); beyond ~64 rows it is compute-bound at about the dense float32 GEMM's
# speed (no cache blocking over `in`), so a tuned GEMM plus one dequantize wins as M grows.
MATVEC_MAX_ROWS: int = 64
# Documented tolerance against the reference, relative to |x| @ |W|ᵀ (float32 reordering).
MATVEC_RTOL: float = 1e-5

_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check(x: torch.Tensor, state: QuantState) -> None:
    """One-line ValueError naming what is wrong with ``x`` or ``state``."""
    if len(state.shape) != 2:
        raise ValueError(
            f"quantized_matmul_few needs a 2-D [out, in] weight; the state has shape "
            f"{tuple(state.shape)}"
        )
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        raise ValueError("quantized_matmul_few: x must be a tensor [..., in] with at least 1 dim")
    if x.shape[-1] != state.shape[1]:
        raise ValueError(
            f"quantized_matmul_few: x has {x.shape[-1]} features in its last dim but the weight "
            f"{tuple(state.shape)} expects {state.shape[1]}; pass x of shape "
            f"[..., {state.shape[1]}]"
        )
    if x.dtype not in _INPUT_DTYPES:
        raise ValueError(
            f"quantized_matmul_few: x must be float32, bfloat16 or float16, got {x.dtype}"
        )
    if x.device != state.device:
        raise ValueError(
            f"quantized_matmul_few: x is on {x.device} but the weight is on {state.device}; "
            "move one of them"
        )


def _state_fits_kernel(state: QuantState) -> bool:
    """Whether ``state``'s tensors have the dtypes and sizes the C kernel reads (it trusts them:
    a short codebook or scale vector would be read past its end)."""
    if state.is_gguf or len(state.shape) != 2 or state.device.type != "cpu":
        return False
    in_features = int(state.shape[1])
    if in_features % state.blocksize or state.blocksize % 32:
        return False  # a row must be whole blocks (the kernel decodes row by row)
    bits = state.bits
    if state.packed.dtype != torch.uint8 or state.packed.numel() * 8 < state.numel * bits:
        return False
    if state.code.numel() != 1 << bits or state.absmax.numel() != state.nblocks:
        return False
    nested = state.nested
    if nested is not None and state.absmax.dtype == torch.uint8:
        return nested.code.numel() == 256 and nested.absmax.numel() * nested.blocksize >= (
            state.nblocks
        )
    return nested is None or state.absmax.dtype == torch.float32


def _kernel_for(x: torch.Tensor, state: QuantState) -> ModuleType | None:
    """The extension when the fused kernel applies to ``x`` and ``state``, else None."""
    if x.device.type != "cpu" or x.dim() == 0 or x.shape[-1] != state.shape[-1]:
        return None
    if x.requires_grad and torch.is_grad_enabled():
        return None  # the kernel has no backward: the reference keeps the graph
    if x.numel() > MATVEC_MAX_ROWS * x.shape[-1] or not _state_fits_kernel(state):
        return None
    return c_extension("matvec")


def matvec_applies(x: torch.Tensor, state: QuantState) -> bool:
    """Whether `quantized_matmul_few` would run the fused C kernel for this ``x`` and ``state``."""
    return _kernel_for(x, state) is not None


def _reference(rows: torch.Tensor, state: QuantState) -> torch.Tensor:
    return rows.float() @ dequantize(state, torch.float32).t()


def quantized_matmul_few(x: torch.Tensor, state: QuantState) -> torch.Tensor:
    """x [..., in] @ deq(state)ᵀ -> float32 [..., out], fused on the CPU for few rows.

    Args:
        x: float32 (or bfloat16/float16, widened to float32) [..., in].
        state: a quantized 2-D weight [out, in].
    Returns:
        float32 [..., out]. The kernel has no backward, so an ``x`` that requires grad (with
        grad enabled) takes the differentiable reference.
    """
    _check(x, state)
    out_features, in_features = int(state.shape[0]), int(state.shape[1])
    rows = x.reshape(-1, in_features)  # [M, in]
    kernel = _kernel_for(x, state)
    if kernel is None:
        return _reference(rows, state).view(*x.shape[:-1], out_features)
    if rows.dtype != torch.float32 or not rows.is_contiguous():
        rows = rows.to(torch.float32).contiguous()  # skipped when already so: ~1 us a call
    y = torch.empty(rows.shape[0], out_features, dtype=torch.float32)  # [M, out]
    _run_kernel(kernel, rows, state, y)
    return y.view(*x.shape[:-1], out_features)


def _run_kernel(kernel: Any, rows: torch.Tensor, state: QuantState, y: torch.Tensor) -> None:
    """y [M, out] = rows [M, in] @ deq(state)ᵀ by the C kernel (arguments already checked).

    A double-quantized state's scales are decoded inside the kernel, block by block, with the
    reference's two roundings: dequantizing the [nblocks] absmax vector in PyTorch first costs
    more than the whole 4096x4096 matvec (several passes over 262k floats per call).
    """
    packed = state.packed.contiguous()
    code = state.code.float().contiguous()
    nested = state.nested
    common = (
        rows.data_ptr(), packed.data_ptr(), 0, code.data_ptr(), y.data_ptr(), rows.shape[0],
        int(state.shape[0]), int(state.shape[1]), state.blocksize, state.bits,
        torch.get_num_threads(), -1,
    )  # fmt: skip
    if nested is not None and state.absmax.dtype == torch.uint8:  # sizes: _state_fits_kernel
        codes = state.absmax.contiguous()
        nested_code = nested.code.float().contiguous()
        nested_absmax = nested.absmax.float().contiguous()
        kernel.matmul(
            *common, codes.data_ptr(), nested_code.data_ptr(), nested_absmax.data_ptr(),
            float(nested.offset), nested.blocksize,
        )  # fmt: skip
    else:
        absmax = dequantize_absmax(state).float().contiguous()  # [nblocks]
        kernel.matmul(*common[:2], absmax.data_ptr(), *common[3:])
