"""GGUF block quantization (llama.cpp's Q4_0 ... Q6_K), dequantized bit-identically to `gguf`.

A GGUF tensor of a block type is stored row by row; each row is ``columns / elements`` blocks
of ``bytes`` bytes, every block carrying its own float16 scale(s) (``block_shape``). Since the
blocks of consecutive rows are contiguous, the whole tensor is one flat run of blocks, and
block ``b`` expands to output elements ``[b * elements, (b + 1) * elements)``.

Exactness: ``gguf.quants.dequantize`` (numpy, float32) is the peer. Both paths here repeat its
float32 operations one for one and in the same order (float16 scales widened to float32
first, then e.g. Q4_1 ``d * q + m`` as a multiply and a separate add, Q4_K ``d * sc`` and
``dmin * m`` first, then ``d * q - dm``), so every float32 value is identical, not merely
close; a bfloat16 / float16 result is that float32 value rounded once (nearest even).

* `dequantize_blocks_reference`: pure PyTorch, any device.
* `dequantize_blocks`: the C kernel (``qlora/kernels/gguf.c``, OpenMP over blocks) on CPU when
  it is built and not disabled (``QLORA_DISABLE_KERNELS``), else the reference.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import ModuleType

import gguf
import torch

from qlora.kernels import c_extension

__all__ = [
    "F16_SCALE_OFFSETS",
    "GGUF_BLOCK_KINDS",
    "bits_per_weight",
    "block_shape",
    "dequantize_blocks",
    "dequantize_blocks_reference",
    "ggml_type",
    "gguf_kind",
    "row_bytes",
]

_Q = gguf.GGMLQuantizationType
# our name -> the ggml type; all of these are types gguf.quants can dequantize
_TYPES: dict[str, gguf.GGMLQuantizationType] = {
    "q4_0": _Q.Q4_0,
    "q4_1": _Q.Q4_1,
    "q5_0": _Q.Q5_0,
    "q5_1": _Q.Q5_1,
    "q8_0": _Q.Q8_0,
    "q2_k": _Q.Q2_K,
    "q3_k": _Q.Q3_K,
    "q4_k": _Q.Q4_K,
    "q5_k": _Q.Q5_K,
    "q6_k": _Q.Q6_K,
}
GGUF_BLOCK_KINDS: tuple[str, ...] = tuple(_TYPES)
# byte offsets of each kind's float16 scale fields inside a block (gguf/quants.py's splits);
# tests and benchmarks write finite scales there to build valid random blocks
F16_SCALE_OFFSETS: dict[str, tuple[int, ...]] = {
    "q4_0": (0,),
    "q4_1": (0, 2),
    "q5_0": (0,),
    "q5_1": (0, 2),
    "q8_0": (0,),
    "q2_k": (80, 82),
    "q3_k": (108,),
    "q4_k": (0, 2),
    "q5_k": (0, 2),
    "q6_k": (208,),
}
_KIND_OF_TYPE = {int(qtype): kind for kind, qtype in _TYPES.items()}

# output dtype -> the code the C kernel takes (same codes as cpu.c)
_OUT_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def gguf_kind(qtype: int | gguf.GGMLQuantizationType) -> str | None:
    """Our name of a ggml tensor type (e.g. ``Q4_1`` -> ``"q4_1"``), None if unsupported."""
    return _KIND_OF_TYPE.get(int(qtype))


def _check_kind(kind: str) -> str:
    if kind not in _TYPES:
        raise ValueError(
            f"unknown GGUF block kind {kind!r}; expected one of {', '.join(GGUF_BLOCK_KINDS)}"
        )
    return kind


def ggml_type(kind: str) -> gguf.GGMLQuantizationType:
    """The ggml type of one of our kinds (``"q8_0"`` -> ``GGMLQuantizationType.Q8_0``)."""
    return _TYPES[_check_kind(kind)]


def block_shape(kind: str) -> tuple[int, int]:
    """(elements per block, bytes per block) of ``kind``, as ``gguf.GGML_QUANT_SIZES`` says."""
    elements, nbytes = gguf.GGML_QUANT_SIZES[ggml_type(kind)]
    return int(elements), int(nbytes)


def row_bytes(kind: str, columns: int) -> int:
    """Bytes of one row of ``columns`` elements (a whole number of blocks)."""
    elements, nbytes = block_shape(kind)
    if columns <= 0 or columns % elements:
        raise ValueError(
            f"a {kind} row of {columns} columns is not a whole number of {elements}-element "
            f"blocks; columns must be a positive multiple of {elements}"
        )
    return columns // elements * nbytes


def bits_per_weight(kind: str) -> float:
    """Storage bits per element, scales included (q4_1 -> 5.0, q8_0 -> 8.5)."""
    elements, nbytes = block_shape(kind)
    return 8 * nbytes / elements


# ---------------------------------------------------------------------------------------
# The reference: per kind, [nblocks, bytes] uint8 -> [nblocks, elements] float32, written
# as gguf/quants.py's `dequantize_blocks`, operation for operation.
# ---------------------------------------------------------------------------------------


def _f16(raw: torch.Tensor) -> torch.Tensor:
    """[n, 2] uint8 (a little-endian float16) -> [n, 1] float32, exactly."""
    return raw.contiguous().view(torch.float16).float()


def _shifts(values: list[int], device: torch.device, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8, device=device).view(shape)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, 16] bytes -> [n, 32]: byte j holds element j (low nibble) and j + 16 (high)."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=1)


def _high_bits32(qh: torch.Tensor) -> torch.Tensor:
    """[n, 4] bytes (a little-endian uint32) -> [n, 32] uint8: bit i is element i's 5th bit."""
    bits = qh.unsqueeze(-1) >> _shifts(list(range(8)), qh.device, (1, 1, 8))  # [n, 4, 8]
    return (bits & 1).reshape(qh.shape[0], 32)


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, 0:2])
    q = _nibbles(b[:, 2:18]).to(torch.int16) - 8
    return d * q.float()


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    q = _nibbles(b[:, 4:20]).float()
    return (d * q) + m


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, 0:2])
    q = (_nibbles(b[:, 6:22]) | (_high_bits32(b[:, 2:6]) << 4)).to(torch.int16) - 16
    return d * q.float()


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    q = (_nibbles(b[:, 8:24]) | (_high_bits32(b[:, 4:8]) << 4)).float()
    return (d * q) + m


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, 0:2])
    x = b[:, 2:34].contiguous().view(torch.int8).float()
    return x * d


def _q2_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scales, qs = b[:, 0:16], b[:, 16:80]
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (scales & 0x0F).float()).view(n, 16, 1)
    ml = (dmin * (scales >> 4).float()).view(n, 16, 1)
    # element h*128 + s*32 + l is bits 2s..2s+1 of qs[h*32 + l]
    q = (qs.reshape(n, 2, 1, 32) >> _shifts([0, 2, 4, 6], b.device, (1, 1, 4, 1))) & 3
    q = q.reshape(n, 16, 16).float()
    return (dl * q - ml).reshape(n, 256)


def _q3_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    hmask, qs, packed, d = b[:, 0:32], b[:, 32:96], b[:, 96:108], _f16(b[:, 108:110])
    # 16 6-bit scales: low 4 bits from bytes 0-7 (low then high nibbles), high 2 from 8-11
    low = torch.cat([packed[:, 0:8] & 0x0F, packed[:, 0:8] >> 4], dim=1)  # [n, 16]
    high = packed[:, 8:12].reshape(n, 1, 4) >> _shifts([0, 2, 4, 6], b.device, (1, 4, 1))
    high = (high & 3).reshape(n, 16)
    scales = ((low | (high << 4)).to(torch.int16) - 32).float()
    dl = (d * scales).view(n, 16, 1)
    ql = (qs.reshape(n, 2, 1, 32) >> _shifts([0, 2, 4, 6], b.device, (1, 1, 4, 1))) & 3
    qh = (hmask.reshape(n, 1, 1, 32) >> _shifts(list(range(8)), b.device, (1, 1, 8, 1))) & 1
    qh = qh.reshape(n, 16, 16) ^ 1  # the offset of 4 applies where the mask bit is 0
    q = (ql.reshape(n, 16, 16).to(torch.int16) - (qh << 2).to(torch.int16)).float()
    return (dl * q).reshape(n, 256)


def _scale_min_k4(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: 12 bytes -> 8 6-bit scales and 8 6-bit mins, each [n, 8] uint8."""
    d, m, md = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc, mn


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _scale_min_k4(b[:, 4:16])
    dl = (d * sc.float()).view(n, 8, 1)
    dm = (dmin * mn.float()).view(n, 8, 1)
    # sub-block 2h + s is nibble s of qs[h*32 : h*32 + 32]
    q = (b[:, 16:144].reshape(n, 4, 1, 32) >> _shifts([0, 4], b.device, (1, 1, 2, 1))) & 0x0F
    return (dl * q.reshape(n, 8, 32).float() - dm).reshape(n, 256)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _scale_min_k4(b[:, 4:16])
    dl = (d * sc.float()).view(n, 8, 1)
    dm = (dmin * mn.float()).view(n, 8, 1)
    ql = (b[:, 48:176].reshape(n, 4, 1, 32) >> _shifts([0, 4], b.device, (1, 1, 2, 1))) & 0x0F
    qh = (b[:, 16:48].reshape(n, 1, 1, 32) >> _shifts(list(range(8)), b.device, (1, 1, 8, 1))) & 1
    q = (ql.reshape(n, 8, 32) | (qh.reshape(n, 8, 32) << 4)).float()
    return (dl * q - dm).reshape(n, 256)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    ql, qh = b[:, 0:128], b[:, 128:192]
    scales = b[:, 192:208].contiguous().view(torch.int8).float()
    dl = (_f16(b[:, 208:210]) * scales).view(n, 16, 1)
    # element h*128 + s*64 + l (l < 64): nibble s of ql[h*64 + l]
    low = (ql.reshape(n, 2, 1, 64) >> _shifts([0, 4], b.device, (1, 1, 2, 1))) & 0x0F
    # element h*128 + s*32 + l (l < 32): bits 2s..2s+1 of qh[h*32 + l]
    high = (qh.reshape(n, 2, 1, 32) >> _shifts([0, 2, 4, 6], b.device, (1, 1, 4, 1))) & 3
    q = (low.reshape(n, 256) | (high.reshape(n, 256) << 4)).to(torch.int16) - 32
    return (dl * q.view(n, 16, 16).float()).reshape(n, 256)


_REFERENCE: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "q4_0": _q4_0,
    "q4_1": _q4_1,
    "q5_0": _q5_0,
    "q5_1": _q5_1,
    "q8_0": _q8_0,
    "q2_k": _q2_k,
    "q3_k": _q3_k,
    "q4_k": _q4_k,
    "q5_k": _q5_k,
    "q6_k": _q6_k,
}


# ---------------------------------------------------------------------------------------
# Checks shared by both paths
# ---------------------------------------------------------------------------------------


def _check(blocks: torch.Tensor, kind: str, shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Validate the arguments; return the number of blocks."""
    _check_kind(kind)
    if dtype not in _OUT_DTYPES:
        raise ValueError(
            f"cannot dequantize {kind} blocks to {dtype}; expected float32, bfloat16 or float16"
        )
    if blocks.dtype != torch.uint8 or not blocks.is_contiguous():
        raise ValueError(
            f"{kind} blocks must be a contiguous uint8 tensor; got {blocks.dtype}"
            f"{'' if blocks.is_contiguous() else ' (not contiguous)'}"
        )
    if len(shape) == 0 or any(int(s) < 0 for s in shape):
        raise ValueError(f"shape {tuple(shape)} is not a tensor shape of at least one dimension")
    rows = math.prod(shape[:-1])
    expected = rows * row_bytes(kind, int(shape[-1]))
    if blocks.numel() != expected:
        raise ValueError(
            f"{kind} blocks for shape {tuple(shape)} must be {expected} bytes "
            f"({rows} rows of {row_bytes(kind, int(shape[-1]))}); got {blocks.numel()}"
        )
    return expected // block_shape(kind)[1]


def _check_out(
    out: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> None:
    numel = math.prod(shape)
    if (
        out.dtype != dtype
        or out.numel() != numel
        or not out.is_contiguous()
        or out.device != device
    ):
        raise ValueError(
            f"out must be a contiguous {dtype} tensor of {numel} elements on {device}; "
            f"got {out.dtype} {tuple(out.shape)} on {out.device}"
        )


def dequantize_blocks_reference(
    blocks: torch.Tensor, kind: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The tensor that GGUF ``kind`` blocks stand for, in pure PyTorch (any device).

    Args:
        blocks: uint8, contiguous, ``rows * row_bytes(kind, shape[-1])`` bytes (any shape).
        kind: one of `GGUF_BLOCK_KINDS`.
        shape: the tensor's shape [*, columns] (ours: rows first, as torch and the GGUF
            reader's numpy arrays have it).
        dtype: float32, bfloat16 or float16: the float32 result rounded once.
    Returns:
        tensor [shape] of ``dtype`` on ``blocks.device``
    """
    nblocks = _check(blocks, kind, shape, dtype)
    nbytes = block_shape(kind)[1]
    values = _REFERENCE[kind](blocks.reshape(nblocks, nbytes))  # [nblocks, elements] f32
    return values.reshape(shape).to(dtype)


def dequantize_blocks(
    blocks: torch.Tensor,
    kind: str,
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """`dequantize_blocks_reference`, fast: the C kernel on CPU when built (else the reference).

    Args:
        blocks, kind, shape, dtype: as in `dequantize_blocks_reference`.
        out: optional preallocated contiguous output of ``dtype`` with ``prod(shape)``
            elements on ``blocks.device``, reused instead of allocating.
    Returns:
        tensor [shape] of ``dtype`` (``out`` viewed as ``shape`` when given)
    """
    nblocks = _check(blocks, kind, shape, dtype)
    if out is not None:
        _check_out(out, shape, dtype, blocks.device)
    kernel = c_extension("gguf")
    if kernel is not None and blocks.device.type == "cpu":
        result = out if out is not None else torch.empty(shape, dtype=dtype)
        _run_kernel(kernel, blocks, kind, nblocks, result)
    else:
        result = dequantize_blocks_reference(blocks, kind, shape, dtype)
        if out is not None:
            out.view(shape).copy_(result)
            result = out
    return result if result.shape == tuple(shape) else result.view(shape)


def _run_kernel(
    kernel: ModuleType, blocks: torch.Tensor, kind: str, nblocks: int, result: torch.Tensor
) -> None:
    """Decode ``nblocks`` blocks of ``kind`` into ``result`` (validated) with the C kernel."""
    kernel.dequantize(
        int(_TYPES[kind]),
        blocks.data_ptr(),
        result.data_ptr(),
        nblocks,
        _OUT_DTYPES[result.dtype],
        torch.get_num_threads(),
    )
