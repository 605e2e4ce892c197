"""MatvecPlan: `quantized_matmul_few` for one fixed weight, its kernel arguments prepared once.

Decoding calls the fused kernel ~200 times per token on small layers, where the kernel itself
takes a few microseconds: rebuilding the QuantState, re-checking it, re-deriving the codebook
and scale pointers (and reading the nested offset back from a tensor) cost several times
more than the arithmetic (measured on the default model's 192x576 k_proj, 1 thread: 40 us
per QuantLinear forward against 8 us for the kernel alone). A plan does all that once, when
a decoder is built for a model whose weights no longer change, and then only hands the
kernel the input and output pointers. Its results are the kernel's, bit for bit (tested
against `quantized_matmul_few`).
"""

from __future__ import annotations

import struct

import torch

from qlora.kernels import c_extension
from qlora.quant.blockwise import dequantize_absmax
from qlora.quant.matvec import MATVEC_MAX_ROWS, _state_fits_kernel, quantized_matmul_few
from qlora.quant.state import QuantState

__all__ = ["MatvecPlan"]


class MatvecPlan:
    """x [M, in] @ deq(state)ᵀ for a fixed ``state``: the fused kernel's arguments bound once.

    Build with `MatvecPlan.create`, which returns None when the kernel cannot take the state
    (not CPU, a GGUF or odd layout, the extension missing). The tensors the kernel reads are
    kept alive by the plan; the state must not change while it is in use.
    """

    def __init__(self, state: QuantState) -> None:
        self.state = state
        self.out_features, self.in_features = int(state.shape[0]), int(state.shape[1])
        packed = state.packed.contiguous()
        code = state.code.float().contiguous()
        self._keep: list[torch.Tensor] = [packed, code]
        nested = state.nested
        self._nested_args: tuple[int | float, ...] = ()
        absmax_ptr = 0
        if nested is not None and state.absmax.dtype == torch.uint8:
            codes = state.absmax.contiguous()
            nested_code = nested.code.float().contiguous()
            nested_absmax = nested.absmax.float().contiguous()
            self._keep += [codes, nested_code, nested_absmax]
            self._nested_args = (
                codes.data_ptr(), nested_code.data_ptr(), nested_absmax.data_ptr(),
                float(nested.offset), nested.blocksize,
            )  # fmt: skip
        else:
            absmax = dequantize_absmax(state).float().contiguous()  # [nblocks]
            self._keep.append(absmax)
            absmax_ptr = absmax.data_ptr()
        self._weight_args = (packed.data_ptr(), absmax_ptr, code.data_ptr())
        self._shape_args = (self.out_features, self.in_features, state.blocksize, state.bits)

    def fields(self) -> list[int]:
        """The kernel's arguments as the 12 integers of a projection in the C decode loop's
        layer description (qlora/kernels/decode.c): packed, absmax, code, absmax_codes,
        nested_code, nested_absmax, offset (float32 bits), nested_blocksize, out, in,
        blocksize, bits. Valid while the plan lives."""
        codes, nested_code, nested_absmax, offset, nested_blocksize = self._nested_args or (
            0, 0, 0, 0.0, 0,
        )  # fmt: skip
        (offset_bits,) = struct.unpack("<I", struct.pack("<f", float(offset)))
        packed, absmax, code = self._weight_args
        return [
            packed, absmax, code, int(codes), int(nested_code), int(nested_absmax),
            offset_bits, int(nested_blocksize), *self._shape_args,
        ]  # fmt: skip

    @classmethod
    def create(cls, state: QuantState) -> MatvecPlan | None:
        """A plan for ``state``, or None when the fused kernel cannot run it."""
        if c_extension("matvec") is None or not _state_fits_kernel(state):
            return None
        return cls(state)

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        """rows [M, in] (any float dtype) -> float32 [M, out]; more than MATVEC_MAX_ROWS rows,
        or the kernels disabled (QLORA_DISABLE_KERNELS), take `quantized_matmul_few`."""
        kernel = c_extension("matvec")  # None when disabled: read at every call
        if kernel is None or rows.dim() != 2 or rows.shape[0] > MATVEC_MAX_ROWS:
            return quantized_matmul_few(rows, self.state)
        if rows.dtype != torch.float32 or not rows.is_contiguous():
            rows = rows.to(torch.float32).contiguous()
        y = torch.empty(rows.shape[0], self.out_features, dtype=torch.float32)  # [M, out]
        kernel.matmul(
            rows.data_ptr(), *self._weight_args, y.data_ptr(), rows.shape[0],
            *self._shape_args, torch.get_num_threads(), -1, *self._nested_args,
        )  # fmt: skip
        return y
