"""Blockwise k-bit quantization of frozen weights (NF4, FP4, INT8, NF2, double quantization)."""

from qlora.quant.blockwise import BLOCKSIZES, dequantize_reference, quantize
from qlora.quant.codebooks import KINDS, QuantKind, codebook
from qlora.quant.dequant import dequantize
from qlora.quant.state import NestedState, QuantState

__all__ = [
    "BLOCKSIZES",
    "KINDS",
    "NestedState",
    "QuantKind",
    "QuantState",
    "codebook",
    "dequantize",
    "dequantize_reference",
    "quantize",
]
