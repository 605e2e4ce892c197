"""Codebooks: the finite sets of values that k-bit codes stand for.

Every quantization kind in `qlora` is "a sorted-or-not table of code values in [-1, 1], times a
per-block absmax". A weight element x in a block with absolute maximum m is stored as the index
of the code nearest to x / m, and read back as ``code[index] * m``. Only the table changes:

* **NF4** (4-bit NormalFloat, QLoRA paper §3). If weights are ~N(0, σ²), then x / m is roughly
  normal too, and the information-theoretically best 4-bit code puts an equal share of the
  probability mass into each bin: the codes are quantiles of N(0, 1). Two details make it
  usable: (1) an exact zero must exist (padding and zero weights must round-trip exactly), and
  (2) the extreme quantiles Φ⁻¹(0) and Φ⁻¹(1) are infinite. The construction therefore builds
  the two halves separately - 2^(k-1) positive quantiles and 2^(k-1) - 1 negative ones, both
  taken from ``linspace(offset, 0.5, ·)`` so that the outermost quantile is Φ⁻¹(offset) instead
  of infinity - joins them with one 0, and divides by the maximum so the table spans [-1, 1].
  The offset is the midpoint of the two candidate "last bin" centres,
  ``offset = ½·((1 - 1/(2·(2^k - 1))) + (1 - 1/(2·2^k)))``; for k = 4 the paper (and
  bitsandbytes) use 0.9677083, which this module reproduces bit for bit.
* **NF2** (our extension): the same construction with k = 2, offset 0.8541667, giving the four
  codes ``[-1, 0, 0.4358, 1]``: one negative code, the exact zero, two positive ones.
* **FP4**: bitsandbytes' E2M1 float (1 sign, 2 exponent, 1 mantissa bit, bias 2) listed in
  bit-pattern order and normalized by its largest magnitude (12). It is not sorted, and codes
  0b0000 and 0b1000 are +0 and -0.
* **INT8**: symmetric absmax int8, codes ``(i - 128) / 127`` for i in 0..255 (i = 0, i.e. -128,
  is never chosen because |x / m| ≤ 1).
* **Dynamic 8-bit map** (Dettmers 2015, "8-bit approximations"): used for double quantization
  of the absmax values. Each code is a decimal exponent 10^-e times a linear fraction; the
  number of fraction levels grows as the exponent shrinks, so small and large magnitudes both
  get relative precision. Built exactly as bitsandbytes builds it (float32 arithmetic).

All tables are float32 and live on the CPU; `codebook(kind)` caches them.
"""

from __future__ import annotations

import typing
from functools import cache
from typing import Literal

import torch

__all__ = [
    "BASE_KINDS",
    "BITS",
    "BNB_KINDS",
    "KINDS",
    "BaseKind",
    "QuantKind",
    "codebook",
    "decision_bounds",
    "dynamic_map",
    "normal_float_codebook",
    "normal_float_offset",
]

QuantKind = Literal["nf4", "fp4", "int8", "nf2"]
KINDS: tuple[str, ...] = typing.get_args(QuantKind)
# What `quant.kind` may say: a codebook above, or "gguf": keep a GGUF file's own block
# quantization (Q4_0, Q4_1, Q8_0, K-quants; `qlora.quant.gguf_blocks`) instead of re-quantizing.
BaseKind = Literal[QuantKind, "gguf"]
BASE_KINDS: tuple[str, ...] = typing.get_args(BaseKind)
BNB_KINDS: tuple[str, ...] = ("nf4", "fp4")  # the kinds bitsandbytes has (int8, nf2: ours)
BITS: dict[str, int] = {"nf4": 4, "fp4": 4, "int8": 8, "nf2": 2}

# The constant bitsandbytes and the QLoRA paper use for 4 bits (the formula gives 0.96770833).
_NF4_OFFSET = 0.9677083


def normal_float_offset(bits: int) -> float:
    """The quantile at which the NormalFloat table is cut off, for a ``bits``-bit code."""
    if bits == 4:
        return _NF4_OFFSET
    n = 2**bits
    return 0.5 * ((1 - 1 / (2 * (n - 1))) + (1 - 1 / (2 * n)))


def normal_float_codebook(bits: int, offset: float | None = None) -> torch.Tensor:
    """The k-bit NormalFloat table: sorted N(0, 1) quantiles with an exact zero, in [-1, 1].

    Args:
        bits: code width k; the table has 2^k entries.
        offset: cut-off quantile; defaults to `normal_float_offset(bits)`.

    Returns:
        float32 tensor [2^k], ascending, first entry -1, last entry 1, one entry exactly 0.
    """
    if bits < 2:
        raise ValueError(f"NormalFloat needs at least 2 bits, got {bits}")
    p = normal_float_offset(bits) if offset is None else offset
    half = 2 ** (bits - 1)
    # linspace in float32 (as bitsandbytes does), inverse normal CDF in float64.
    positive = torch.special.ndtri(torch.linspace(p, 0.5, half + 1)[:-1].double())
    negative = -torch.special.ndtri(torch.linspace(p, 0.5, half)[:-1].double())
    values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).float()
    values = values.sort().values
    return values / values.max()


def dynamic_map(
    signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8
) -> torch.Tensor:
    """The dynamic (exponent + linear fraction) 8-bit map of bitsandbytes, ascending, [256]."""
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        exponent = i + non_sign_bits - max_exponent_bits
        levels = 2**exponent + 1 if signed else 2 ** (exponent + 1) + 1
        fraction_edges = torch.linspace(0.1, 1, levels, dtype=torch.float32)
        fraction_means = (fraction_edges[:-1] + fraction_edges[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + i)
        data += (scale * fraction_means).tolist()
        if signed:
            data += (-scale * fraction_means).tolist()
    if additional_items > 0:
        fraction_edges = torch.linspace(0.1, 1, additional_items + 1, dtype=torch.float32)
        fraction_means = (fraction_edges[:-1] + fraction_edges[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1)
        data += (scale * fraction_means).tolist()
        if signed:
            data += (-scale * fraction_means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (2**total_bits - len(data))
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def _fp4_table() -> torch.Tensor:
    # Bit patterns 0b0000..0b0111 are the positive magnitudes (sign bit 0b1000 clear).
    e2m1 = [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0]
    table = torch.tensor(e2m1 + [-v for v in e2m1], dtype=torch.float32)
    return table / table.abs().max()


@cache
def codebook(kind: str) -> torch.Tensor:
    """The float32 code table of ``kind`` (index = stored code). Do not modify the result."""
    if kind == "nf4":
        return normal_float_codebook(4)
    if kind == "nf2":
        return normal_float_codebook(2)
    if kind == "fp4":
        return _fp4_table()
    if kind == "int8":
        return (torch.arange(256, dtype=torch.float32) - 128) / 127
    if kind == "dynamic":
        return dynamic_map(signed=True)
    raise ValueError(f"unknown quantization kind {kind!r}; choose one of {', '.join(KINDS)}")


@cache
def decision_bounds(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Midpoints between neighbouring codes in value order, and the value order itself.

    ``torch.bucketize(x, bounds)`` (right=False) then gives the rank of the nearest code with a
    tie - x exactly on a midpoint - going to the lower-valued code; ``order[rank]`` is the stored
    code. FP4's +0 (code 0) and -0 (code 8) compare equal; bitsandbytes ranks +0 first, so a
    scaled value in (0, 0.0026] is stored as code 8 (-0). Both read back as zero.

    Returns:
        bounds: float32 [2^k - 1]; order: int64 [2^k].
    """
    table = codebook(kind)
    order = torch.argsort(table, stable=True)
    ranked = table[order]
    return (ranked[:-1] + ranked[1:]) / 2, order
