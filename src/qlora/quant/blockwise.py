"""Blockwise k-bit quantization: the slow, obvious reference that every fast path must match.

A tensor is flattened row-major and cut into blocks of ``blocksize`` elements (the last block
may be short). Each block is scaled into [-1, 1] by its absolute maximum m, each scaled value
is replaced by the index of the nearest code of the kind's table, and the indices are packed
``8 / bits`` to a byte, first element in the high bits. Reading back is ``code[index] * m``.

Bit-exactness with bitsandbytes (CPU, v0.50) pins down details that look arbitrary:

* the scale of a full block is applied as ``x * (1 / m)``; a short last block as ``x / m``;
  a zero block divides by 1e-38 instead of 0 (and a short zero block stores m = 1e-38);
* "nearest" is decided by comparing with the midpoints between sorted codes, a value on a
  midpoint going to the lower code (`torch.bucketize`, right=False);
* an odd element count is padded with the code of 0.0.

**Double quantization** (QLoRA §3): with blocksize 64 the fp32 scales alone cost 32/64 = 0.5
bits per parameter. The scales are positive and clustered, so we subtract their mean (kept as
one fp32 offset) and quantize the centred values with the signed dynamic 8-bit map in blocks
of 256. The cost drops to 8/64 + 32/(64·256) ≈ 0.127 bits, i.e. NF4+DQ ≈ 4.127 bits/param.
For this second level bitsandbytes' CPU kernel rounds through a 65536-entry lookup table
instead of using midpoints (see `quantize_dynamic`); we replicate it so the bytes agree.
"""

from __future__ import annotations

import threading
from functools import cache
from typing import Any

import torch

from qlora.kernels import c_extension
from qlora.quant.codebooks import BITS, KINDS, codebook, decision_bounds
from qlora.quant.state import NestedState, QuantState

__all__ = [
    "BLOCKSIZES",
    "dequantize_absmax",
    "dequantize_reference",
    "pack_codes",
    "quantize",
    "quantize_dynamic",
    "unpack_codes",
]

BLOCKSIZES: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TINY = 1e-38  # bitsandbytes' floor for a zero block's scale


def _check_input(weight: torch.Tensor, kind: str, blocksize: int) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown quantization kind {kind!r}; choose one of {', '.join(KINDS)}")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"quantize expects a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"quantize supports float32, float16 and bfloat16 tensors, got {weight.dtype}; "
            "convert with .float() first"
        )
    if weight.numel() == 0:
        raise ValueError(f"cannot quantize an empty tensor (shape {tuple(weight.shape)})")
    if blocksize not in BLOCKSIZES:
        raise ValueError(
            f"unsupported blocksize {blocksize}; choose one of {', '.join(map(str, BLOCKSIZES))}"
        )


_CHUNK = 1 << 22  # elements per quantization chunk (a multiple of every blocksize)


def _scale_blocks(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block absmax [nblocks] and the values scaled into [-1, 1] [n] (float32)."""
    n = flat.numel()
    rem = n % blocksize
    full = n - rem
    blocks = flat[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(dim=-1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=_TINY)).view(-1, 1), -1, 1).view(-1)
    if rem:
        tail_max = flat[full:].abs().max().clamp(min=_TINY)
        absmax = torch.cat([absmax, tail_max.view(1)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail_max, -1, 1)])
    return absmax, scaled


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack code indices (uint8, < 2^bits) into bytes, first element in the highest bits.

    Args:
        codes: uint8 [n], already padded to a multiple of 8 / bits.
    Returns:
        uint8 [n * bits / 8]
    """
    per_byte = 8 // bits
    if per_byte == 1:
        return codes
    grouped = codes.view(-1, per_byte)
    packed = grouped[:, 0] << (8 - bits)
    for j in range(1, per_byte):
        packed |= grouped[:, j] << (8 - bits * (j + 1))
    return packed


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_codes`: uint8 [nbytes] -> int64 code indices [n]."""
    per_byte = 8 // bits
    if per_byte == 1:
        return packed[:n].long()
    mask = (1 << bits) - 1
    shifts = torch.tensor(
        [8 - bits * (j + 1) for j in range(per_byte)], dtype=torch.int32, device=packed.device
    )
    codes = (packed.int().unsqueeze(-1) >> shifts) & mask  # [nbytes, per_byte]
    return codes.reshape(-1)[:n].long()


_DYNAMIC_LUT_SIZE = 65536


@cache
def _dynamic_lookup_table() -> torch.Tensor:
    """uint8 [65536]: code index for each of 65536 evenly spaced values in [-1, 1]."""
    table = codebook("dynamic")
    midpoints = 0.5 * (table[:-1] + table[1:])
    grid = -1.0 + (2.0 * torch.arange(_DYNAMIC_LUT_SIZE, dtype=torch.float32)) / (
        _DYNAMIC_LUT_SIZE - 1
    )
    # the index of the first midpoint >= value = the number of midpoints below it
    return torch.bucketize(grid, midpoints).to(torch.uint8)


def quantize_dynamic(
    values: torch.Tensor, blocksize: int = 256
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Blockwise quantization with the signed dynamic 8-bit map (bitsandbytes' CPU rule).

    bitsandbytes' CPU kernel does not search the 256 codes per value: it rounds the scaled
    value v to one of 65536 grid points, ``trunc(((v + 1) * 0.5) * 65535 + 0.5)``, and reads
    the code from a table built once per codebook (the code nearest to each grid point). The
    result is the nearest code except within ~1.5e-5 of a midpoint. An all-zero block gets
    code 0 (which reads back as 0 because its scale is 0).

    Args:
        values: float32 [n]
    Returns:
        codes uint8 [n], absmax float32 [ceil(n / blocksize)], code table float32 [256]
    """
    table = codebook("dynamic").to(values.device)
    lookup = _dynamic_lookup_table().to(values.device)
    n = values.numel()
    pad = -n % blocksize
    blocks = torch.nn.functional.pad(values, (0, pad)).view(-1, blocksize)
    absmax = blocks.abs().amax(dim=-1)
    scaled = torch.clamp(blocks * (1.0 / absmax).view(-1, 1), -1.0, 1.0)
    grid_index = ((((scaled + 1.0) * 0.5) * (_DYNAMIC_LUT_SIZE - 1)) + 0.5).to(torch.int32)
    codes = lookup[grid_index.clamp(0, _DYNAMIC_LUT_SIZE - 1)]
    codes = torch.where((absmax == 0).view(-1, 1), 0, codes).to(torch.uint8)
    return codes.view(-1)[:n], absmax, table


def dequantize_absmax(state: QuantState) -> torch.Tensor:
    """The fp32 per-block scales of ``state`` (undoing double quantization if present)."""
    if state.nested is None:
        return state.absmax.float()
    nested = state.nested
    values = nested.code[state.absmax.long()]
    n = values.numel()
    pad = -n % nested.blocksize
    values = torch.nn.functional.pad(values, (0, pad)).view(-1, nested.blocksize)
    return (values * nested.absmax.view(-1, 1)).view(-1)[:n] + nested.offset


def _codes_reference(
    chunk: torch.Tensor, blocksize: int, bits: int, bounds: torch.Tensor, order: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """absmax [nblocks] and packed codes of one chunk, in plain PyTorch (the oracle)."""
    absmax, scaled = _scale_blocks(chunk.float(), blocksize)
    pad = -scaled.numel() % (8 // bits)
    if pad:
        scaled = torch.nn.functional.pad(scaled, (0, pad))
    ranks = torch.bucketize(scaled, bounds, out_int32=True)
    del scaled
    # NF4/NF2/INT8 codebooks are stored in value order, so rank == code and the gather is skipped.
    identity = bool((order == torch.arange(order.numel(), device=order.device)).all())
    codes = ranks.to(torch.uint8) if identity else order[ranks]
    return absmax, pack_codes(codes, bits)


_staging = threading.local()  # per-thread float32 buffer of _CHUNK elements, reused


def _staging_buffer() -> torch.Tensor:
    buffer = getattr(_staging, "buffer", None)
    if buffer is None:
        buffer = _staging.buffer = torch.empty(_CHUNK, dtype=torch.float32)
    return buffer


def _quantize_kernel(
    kernel: Any, flat: torch.Tensor, blocksize: int, bits: int, bounds: torch.Tensor,
    order: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """absmax [nblocks] and packed codes of ``flat`` by the C kernel, chunk by chunk.

    The outputs are allocated once at their final size and each chunk is written into its
    slice; 16-bit input is widened into one reused float32 staging buffer. Loading a 7B
    checkpoint calls this ~200 times: allocating temporaries per chunk would interleave short-
    and long-lived blocks on the heap and leave ~0.7 GB of fragmentation behind.
    """
    n = flat.numel()
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32)
    packed = torch.empty(-(-n * bits // 8), dtype=torch.uint8)
    for start in range(0, n, _CHUNK):  # _CHUNK is a multiple of blocksize and of 8 / bits
        chunk = flat[start : start + _CHUNK]
        if chunk.dtype != torch.float32 or not chunk.is_contiguous():
            chunk = _staging_buffer()[: chunk.numel()].copy_(chunk)
        kernel.quantize(
            chunk.data_ptr(), chunk.numel(), blocksize, bounds.data_ptr(), order.data_ptr(),
            bits, packed.data_ptr() + start * bits // 8,
            absmax.data_ptr() + (start // blocksize) * absmax.element_size(),
            torch.get_num_threads(),
        )  # fmt: skip
    return absmax, packed


def quantize(
    weight: torch.Tensor,
    kind: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    *,
    reference: bool = False,
) -> QuantState:
    """Quantize ``weight`` blockwise to ``kind`` ("nf4", "fp4", "int8" or "nf2").

    Args:
        weight: float32/float16/bfloat16 tensor of any shape [*].
        kind: the codebook; see `qlora.quant.codebooks`.
        blocksize: elements per absmax block, a power of two in 32..4096.
        double_quant: quantize the absmax values too (8-bit, blocks of 256).
        reference: use the plain-PyTorch path even where the C kernel could run (the
            oracle the kernel is tested against; both give identical bytes).

    Returns:
        A `QuantState`; `dequantize(state)` gives back a tensor of ``weight``'s dtype and shape.
    """
    _check_input(weight, kind, blocksize)
    bits = BITS[kind]
    flat = weight.detach().reshape(-1)
    bounds, order = decision_bounds(kind)
    bounds = bounds.to(flat.device).contiguous()
    order = order.to(device=flat.device, dtype=torch.uint8).contiguous()
    kernel = c_extension("cpu") if not reference and flat.device.type == "cpu" else None
    if kernel is not None and hasattr(kernel, "quantize"):
        absmax, packed = _quantize_kernel(kernel, flat, blocksize, bits, bounds, order)
    else:
        # In chunks (a multiple of every blocksize): blocks are independent, so the result is
        # identical, and the float32 temporaries stay ~5 x 16 MiB whatever the tensor's size.
        absmaxes: list[torch.Tensor] = []
        packs: list[torch.Tensor] = []
        for start in range(0, flat.numel(), _CHUNK):
            chunk_absmax, chunk_packed = _codes_reference(
                flat[start : start + _CHUNK], blocksize, bits, bounds, order
            )
            absmaxes.append(chunk_absmax)
            packs.append(chunk_packed)
        absmax = torch.cat(absmaxes) if len(absmaxes) > 1 else absmaxes[0]
        packed = torch.cat(packs) if len(packs) > 1 else packs[0]
    if not bool(torch.isfinite(absmax).all()):
        bad = int((~torch.isfinite(absmax)).nonzero()[0]) * blocksize
        raise ValueError(
            f"cannot quantize a tensor with NaN or inf values (first near flat index {bad}); "
            "check the checkpoint or the training run that produced it"
        )
    nested = None
    if double_quant:
        offset = absmax.mean()
        abs_codes, abs_scale, table = quantize_dynamic(absmax - offset, 256)
        nested = NestedState(absmax=abs_scale, code=table.clone(), offset=offset, blocksize=256)
        absmax = abs_codes
    return QuantState(
        kind=kind,
        packed=packed,
        absmax=absmax,
        shape=weight.shape,
        dtype=weight.dtype,
        blocksize=blocksize,
        code=codebook(kind).to(weight.device).clone(),
        nested=nested,
    )


def dequantize_reference(state: QuantState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Slow, obvious dequantization: ``code[index] * absmax`` in float32, then cast.

    Args:
        state: from `quantize` (or a bitsandbytes state dict).
        dtype: output dtype; defaults to the original tensor's.
    Returns:
        tensor [state.shape] of ``dtype``.
    """
    n = state.numel
    indices = unpack_codes(state.packed, state.bits, n)
    values = state.code.float()[indices]
    pad = -n % state.blocksize
    values = torch.nn.functional.pad(values, (0, pad)).view(-1, state.blocksize)
    out = (values * dequantize_absmax(state).view(-1, 1)).view(-1)[:n]
    return out.to(dtype or state.dtype).view(state.shape)
