"""8-bit blockwise optimizer state (Dettmers et al. 2022, "8-bit Optimizers via Block-wise
Quantization").

Adam keeps two running moments per parameter, m (mean of gradients) and v (mean of squared
gradients): 8 bytes per parameter in fp32, twice the fp32 weights themselves. Stored in 8 bits
they cost 2 bytes plus one fp32 scale per block of 256 values (+0.03 bytes).

Why it works, and the choices that make it work:

* **Blockwise scaling.** One absmax per 256 values confines an outlier's damage to its own
  block; a per-tensor scale would flush every small moment in the tensor to zero.
* **The dynamic map, not a linear one.** Moments span many orders of magnitude inside one
  block (v is a square). The dynamic 8-bit map spends one bit on the sign, a unary-coded
  decimal exponent and the remaining bits on a linear fraction, so relative precision holds
  from 1e-7 to 1 of the block's absmax. m is signed (`dynamic_map(signed=True)`); v is never
  negative, so its map (`signed=False`) spends the sign bit on precision instead.
* **Small tensors stay fp32.** Below 4096 elements (biases, norms) the saving is negligible
  and those parameters are the most sensitive; bitsandbytes draws the same line.
* **Update in fp32.** Each step dequantizes a chunk of both moments to fp32, applies the
  ordinary AdamW update, and requantizes - the rounding error is not allowed to accumulate in
  the update arithmetic itself, only in what is stored between steps.

"Nearest code" is decided against the midpoints between the sorted codes (a value exactly on
a midpoint goes to the lower code) with the scaling rules of `qlora.quant.blockwise` - the same
C kernel quantizes frozen weights and optimizer moments. bitsandbytes' CPU kernel rounds
through a 65536-entry lookup table instead, so its codes can differ from ours within ~1.5e-5
of a midpoint: one code step, i.e. within the quantization error.
"""

from __future__ import annotations

from functools import cache

import torch

from qlora.kernels import c_extension
from qlora.quant.codebooks import dynamic_map

__all__ = [
    "BLOCK",
    "MIN_QUANTIZED_NUMEL",
    "dequantize_state",
    "fused_kernel_args",
    "nblocks",
    "quantize_state",
    "state_code",
]

BLOCK = 256  # values per fp32 absmax
MIN_QUANTIZED_NUMEL = 4096  # smaller tensors keep fp32 moments
_TINY = 1e-38  # scale floor of a zero block (see qlora.quant.blockwise)


def nblocks(numel: int) -> int:
    return -(-numel // BLOCK)


@cache
def state_code(signed: bool) -> torch.Tensor:
    """The dynamic 8-bit map: float32 [256], ascending (signed for m, unsigned for v)."""
    return dynamic_map(signed=signed)


@cache
def _bounds(signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    code = state_code(signed)
    return (code[:-1] + code[1:]) / 2, torch.arange(256, dtype=torch.uint8)


_LUT_EXPONENTS = 27  # |v| in [2^-26, 2): float exponents 101..127 (biased)
_LUT_MANTISSA_BITS = 10


@cache
def _lookup_table(signed: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The C kernel's bucket table (see ``quantize8_lut`` in cpu.c): for each bucket of
    floats sharing sign, exponent and the top 10 mantissa bits, the rank of its smallest
    value. Checked here: no bucket holds two midpoints, and none lies in (-2^-26, 2^-26).

    Returns:
        lut uint8 [2 * 27 * 1024], bounds float32 [256] (last +inf), the rank of 0.
    """
    bounds, _ = _bounds(signed)
    shift = 23 - _LUT_MANTISSA_BITS
    buckets = torch.arange(_LUT_EXPONENTS << _LUT_MANTISSA_BITS, dtype=torch.int64)
    lo_bits = ((buckets >> _LUT_MANTISSA_BITS) + 101) << 23 | (buckets & 1023) << shift
    hi_bits = lo_bits + (1 << shift) - 1  # the largest magnitude in the bucket
    lo = lo_bits.to(torch.int32).view(torch.float32)
    hi = hi_bits.to(torch.int32).view(torch.float32)
    tables = []
    for smallest, largest in ((lo, hi), (-hi, -lo)):  # positive buckets, then negative
        first = torch.bucketize(smallest, bounds)  # bounds below the bucket's smallest value
        last = torch.bucketize(largest, bounds, right=True)  # bounds <= its largest value
        if int((last - first).max()) > 1:
            raise AssertionError("a lookup bucket holds two midpoints: use more mantissa bits")
        tables.append(first.to(torch.uint8))
    tiny = 2.0**-26
    if bool(((bounds > -tiny) & (bounds < tiny)).any()):
        raise AssertionError("a midpoint lies below 2^-26: widen the lookup table")
    padded = torch.cat([bounds, torch.tensor([float("inf")])])
    zero_rank = int(torch.bucketize(torch.tensor(0.0), bounds))
    return torch.cat(tables).contiguous(), padded.contiguous(), zero_rank


@cache
def fused_kernel_args() -> tuple:
    """The table pointers ``adamw8bit_step`` takes: code_m, code_v, lut_m, bounds_m, zero_m,
    lut_v, bounds_v, zero_v (the tensors are cached, so the pointers stay valid)."""
    lut_m, bounds_m, zero_m = _lookup_table(True)
    lut_v, bounds_v, zero_v = _lookup_table(False)
    return (
        state_code(True).data_ptr(), state_code(False).data_ptr(),
        lut_m.data_ptr(), bounds_m.data_ptr(), zero_m,
        lut_v.data_ptr(), bounds_v.data_ptr(), zero_v,
    )  # fmt: skip


def dequantize_state(
    codes: torch.Tensor, absmax: torch.Tensor, signed: bool, out: torch.Tensor
) -> torch.Tensor:
    """``code[codes] * absmax[block]`` into ``out``.

    Args:
        codes: uint8 [n], contiguous.
        absmax: float32 [ceil(n / 256)], contiguous.
        out: float32 [n], contiguous.
    """
    code = state_code(signed)
    kernel = c_extension("cpu") if codes.device.type == "cpu" else None
    n = codes.numel()
    if kernel is not None:
        kernel.dequantize(
            codes.data_ptr(), absmax.data_ptr(), code.data_ptr(), out.data_ptr(),
            n, BLOCK, 8, 0, torch.get_num_threads(),
        )  # fmt: skip
        return out
    values = code.to(codes.device)[codes.long()]
    pad = -n % BLOCK
    values = torch.nn.functional.pad(values, (0, pad)).view(-1, BLOCK) * absmax.view(-1, 1)
    return out.copy_(values.view(-1)[:n])


def quantize_state(
    values: torch.Tensor,
    signed: bool,
    codes_out: torch.Tensor,
    absmax_out: torch.Tensor,
    *,
    reference: bool = False,
) -> None:
    """Quantize ``values`` blockwise into ``codes_out`` and ``absmax_out`` (in place).

    Args:
        values: float32 [n], contiguous.
        codes_out: uint8 [n], contiguous.
        absmax_out: float32 [ceil(n / 256)], contiguous.
        reference: use the PyTorch path even where the C kernel could run (the oracle).
    """
    bounds, order = _bounds(signed)
    kernel = c_extension("cpu") if values.device.type == "cpu" and not reference else None
    if kernel is not None and hasattr(kernel, "quantize8_lut"):
        lut, padded, zero_rank = _lookup_table(signed)
        kernel.quantize8_lut(
            values.data_ptr(), values.numel(), BLOCK, lut.data_ptr(), padded.data_ptr(),
            zero_rank, codes_out.data_ptr(), absmax_out.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        return
    if kernel is not None:
        kernel.quantize(
            values.data_ptr(), values.numel(), BLOCK, bounds.data_ptr(), order.data_ptr(), 8,
            codes_out.data_ptr(), absmax_out.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        return
    n = values.numel()
    full = n - n % BLOCK
    blocks = values[:full].view(-1, BLOCK)
    absmax = blocks.abs().amax(dim=-1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=_TINY)).view(-1, 1), -1, 1).view(-1)
    if full < n:  # a short last block divides (and stores a floored scale), as bitsandbytes
        tail = values[full:].abs().max().clamp(min=_TINY)
        absmax = torch.cat([absmax, tail.view(1)])
        scaled = torch.cat([scaled, torch.clamp(values[full:] / tail, -1, 1)])
    codes_out.copy_(torch.bucketize(scaled, bounds.to(values.device)).to(torch.uint8))
    absmax_out.copy_(absmax)
