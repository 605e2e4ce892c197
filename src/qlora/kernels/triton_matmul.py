"""Triton kernel: fused blockwise k-bit dequantize + matmul for a few tokens (decoding).

    y[M, N] = x[M, K] @ deq(W)[N, K]^T,    deq(W)[i] = code[index_i] · absmax[i // blocksize]

where ``W`` is the row-major flattened [N, K] weight of a `QuantState` (2, 4 or 8 bits per
code, first element in the high bits of a byte). Each program computes a [BLOCK_M, BLOCK_N]
tile of ``y`` and walks K in BLOCK_K steps; for every step it decodes the [BLOCK_N, BLOCK_K]
tile of W in registers exactly as the dequantize kernel does (byte load, shift, mask, codebook
gather, one float32 multiply by the block's scale) and feeds it to ``tl.dot`` with float32
accumulation. The dequantized weight never touches memory.

Why it pays: with M ≤ `FUSED_MAX_TOKENS` the matmul is memory-bound - each weight is used by
only M rows of ``x``. Dequantize-then-matmul writes a 2–4 byte copy of every weight and reads it
back, on top of reading the bits/8-byte codes; the fused kernel reads only the codes (the
scales add 4/blocksize bytes to both). Its ideal speedup is therefore about
``(2 · dtype_bytes + bits/8) / (bits/8)``: 9× for nf4 into bf16, 17× into float32. As M grows
the dequantize cost is amortised over M rows and cuBLAS (`dequantize` + ``x @ W.T``) wins;
`FUSED_MAX_TOKENS` = 16 is one BLOCK_M tile, callers should switch above it (the exact
crossover depends on the GPU: measure with ``benchmarks/bench_triton.py``).

Design choices:

* **tl.dot with BLOCK_M = 16 for every M ≤ 16** rather than a broadcast multiply + ``tl.sum``.
  ``tl.dot`` needs tiles of at least 16 rows on a GPU, so for M = 1, 15/16 of the MMA work is
  padding. For bf16/fp16 it runs on tensor cores: the padded product costs 32 flops per
  weight, ~0.2 PFLOP/s when nf4 codes stream at 3.35 TB/s, a fifth of an H100's dense bf16
  peak - still memory-bound, and one code path serves 1 to 16 tokens. A broadcast product
  holds BLOCK_M·BLOCK_N·BLOCK_K values in registers, which spills beyond a couple of rows.
  float32 inputs use ``input_precision="ieee"`` (no TF32 rounding) so they match ``x @ W.T`` in
  float32; that runs on CUDA cores, where the padding makes the kernel compute-bound (still
  well ahead of a float32 dequantize-then-matmul, which moves 8.5 bytes per weight). bf16/fp16
  inputs round the decoded tile to their dtype first, exactly what dequantize-then-matmul does.
* **Split-K** when the output tiles alone would leave SMs idle (M = 1, N = 4096 makes only 128
  tiles of 32 columns): ``SPLIT_K`` programs share the K range of a tile, each writes a float32
  partial sum, and one small ``sum`` adds them (deterministic, no atomics). The extra traffic is
  SPLIT_K·M·N·4 bytes, negligible next to N·K·bits/8.
* **Scales**: when every row starts a block (K % blocksize == 0) and BLOCK_K divides blocksize,
  a W tile row lies in one block and the kernel loads one scale per row per step. Otherwise -
  K not a multiple of blocksize, so a block can span two rows, or blocksize < BLOCK_K - it
  gathers ``absmax[i // blocksize]`` per element (served by L1: a tile touches few blocks). Both
  are exact; no shape falls back.
* Codes are loaded one byte per element (a byte is read 8/bits times, from L1), which handles a
  row starting in the middle of a byte (K·bits not a multiple of 8) without special cases.

It runs on a GPU, and - for tests - on the CPU under Triton's interpreter
(``TRITON_INTERPRET=1``), which executes the same program with NumPy. One difference: the
interpreter has no bfloat16 arithmetic (its ``tl.dot`` multiplies the uint16 bit patterns,
triton#11584), so under it a bf16/fp16 tile is rounded to its dtype and then multiplied in
float32 - the same exact products the tensor cores form. (Its float32 → bf16 casts truncate
where a GPU rounds to nearest even: both are inside the tests' bf16 tolerance.)
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is optional
    triton = None
    tl = None

__all__ = ["FUSED_MAX_TOKENS", "available", "quantized_matmul_triton"]

FUSED_MAX_TOKENS = 16
"""Above this many rows of ``x``, dequantize + matmul (cuBLAS) is the faster path."""

_BLOCK_M = 16
_BLOCK_N = 32
_BLOCK_K = 128
_SUPPORTED_BITS = (2, 4, 8)
_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _matmul_kernel(
        x_ptr,
        packed_ptr,
        absmax_ptr,
        code_ptr,
        out_ptr,
        M,
        N,
        K,
        tiles_per_split,
        BLOCKSIZE: tl.constexpr,
        BITS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        SCALE_PER_ROW: tl.constexpr,
        X_FP32: tl.constexpr,
        UPCAST_DOT: tl.constexpr,
    ):
        per_byte: tl.constexpr = 8 // BITS
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)

        rows_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
        rows_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
        cols = tl.arange(0, BLOCK_K)  # [BK]
        inside_m = rows_m < M
        inside_n = rows_n < N
        x_rows = x_ptr + rows_m.to(tl.int64)[:, None] * K  # [BM, 1]
        w_rows = rows_n.to(tl.int64) * K  # [BN] flat index of each row's first element

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        k_tiles = tl.cdiv(K, BLOCK_K)
        first = pid_k * tiles_per_split
        last = tl.minimum(first + tiles_per_split, k_tiles)
        for tile in range(first, last):
            k = tile * BLOCK_K + cols  # [BK]
            inside_k = k < K
            x = tl.load(x_rows + k[None, :], mask=inside_m[:, None] & inside_k[None, :], other=0.0)

            w_mask = inside_n[:, None] & inside_k[None, :]
            flat = w_rows[:, None] + k[None, :]  # [BN, BK] int64
            byte = tl.load(packed_ptr + flat // per_byte, mask=w_mask, other=0).to(tl.int32)
            shift = (BITS * (per_byte - 1 - flat % per_byte)).to(tl.int32)
            index = (byte >> shift) & ((1 << BITS) - 1)
            value = tl.load(code_ptr + index, mask=w_mask, other=0.0)
            if SCALE_PER_ROW:
                start = w_rows + tile * BLOCK_K  # [BN]: the tile row lies in one block
                scale = tl.load(absmax_ptr + start // BLOCKSIZE, mask=inside_n, other=0.0)
                w = value * scale[:, None]
            else:
                scale = tl.load(absmax_ptr + flat // BLOCKSIZE, mask=w_mask, other=0.0)
                w = value * scale

            if X_FP32:
                acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
            elif UPCAST_DOT:
                # the interpreter multiplies bfloat16 bit patterns in tl.dot (triton#11584): do
                # the same products in float32, where a product of two bf16/fp16 values is exact
                w = w.to(x.dtype).to(tl.float32)
                acc = tl.dot(x.to(tl.float32), tl.trans(w), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)

        out_rows = out_ptr + pid_k.to(tl.int64) * M * N + rows_m.to(tl.int64)[:, None] * N
        tl.store(
            out_rows + rows_n[None, :],
            acc.to(out_ptr.dtype.element_ty),
            mask=inside_m[:, None] & inside_n[None, :],
        )


def _interpreted() -> bool:
    """Whether the kernel was built for Triton's interpreter (TRITON_INTERPRET=1)."""
    return type(_matmul_kernel).__name__ == "InterpretedFunction"


def _default_split_k(programs: int, k_tiles: int, device: torch.device) -> int:
    """Enough K splits to give every SM about two programs, each keeping ≥ 4 K tiles."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(-(-2 * sms // programs), k_tiles // 4))


def quantized_matmul_triton(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    out_features: int,
    in_features: int,
    blocksize: int,
    bits: int,
    *,
    split_k: int | None = None,
    block_n: int = _BLOCK_N,
    block_k: int = _BLOCK_K,
) -> torch.Tensor:
    """``x @ deq(W).T`` without materialising ``deq(W)``; meant for M ≤ `FUSED_MAX_TOKENS`.

    Args:
        x: contiguous float32/bfloat16/float16 [M, K].
        packed: uint8 [ceil(N · K · bits / 8)] codes of the flattened [N, K] weight.
        absmax: float32 [ceil(N · K / blocksize)] per-block scales (double quantization
            already undone: `qlora.quant.blockwise.dequantize_absmax`).
        code: float32 [2^bits] codebook.
        out_features: N.
        in_features: K.
        blocksize: elements per scale block (a power of two, 32..4096).
        bits: 2, 4 or 8.
        split_k: programs sharing the K range of an output tile (default: enough to fill the
            GPU; 1 on the CPU interpreter).
        block_n, block_k: tile sizes (powers of two ≥ 16).
    Returns:
        [M, N] in x's dtype (float32 accumulation, one rounding at the end).
    """
    if triton is None:
        raise RuntimeError("triton is not installed; pip install 'qlora[triton]'")
    if bits not in _SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {_SUPPORTED_BITS}, got {bits}")
    if x.dtype not in _INPUT_DTYPES:
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if x.dim() != 2 or x.shape[1] != in_features:
        raise ValueError(f"x must be [M, {in_features}], got {tuple(x.shape)}")
    n, k = out_features, in_features
    if packed.numel() != -(-n * k * bits // 8):
        raise ValueError(
            f"packed has {packed.numel()} bytes but a [{n}, {k}] weight at {bits} bits needs "
            f"{-(-n * k * bits // 8)}"
        )
    if absmax.dtype != torch.float32 or absmax.numel() != -(-n * k // blocksize):
        raise ValueError(
            f"absmax must be float32 [{-(-n * k // blocksize)}], got {absmax.dtype} "
            f"{tuple(absmax.shape)}"
        )
    x = x.contiguous()
    m = x.shape[0]
    if m == 0 or n == 0 or k == 0:
        return torch.zeros((m, n), dtype=x.dtype, device=x.device)
    k_tiles = triton.cdiv(k, block_k)
    grid_mn = triton.cdiv(m, _BLOCK_M) * triton.cdiv(n, block_n)
    if split_k is None:
        split_k = _default_split_k(grid_mn, k_tiles, x.device)
    split_k = max(1, min(split_k, k_tiles))
    tiles_per_split = triton.cdiv(k_tiles, split_k)
    split_k = triton.cdiv(k_tiles, tiles_per_split)  # no empty trailing split
    if split_k == 1:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    else:
        out = torch.empty((split_k, m, n), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(m, _BLOCK_M), triton.cdiv(n, block_n), split_k)
    _matmul_kernel[grid](
        x,
        packed.contiguous(),
        absmax.contiguous(),
        code.float().contiguous(),
        out,
        m,
        n,
        k,
        tiles_per_split,
        BLOCKSIZE=blocksize,
        BITS=bits,
        BLOCK_M=_BLOCK_M,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        SCALE_PER_ROW=k % blocksize == 0 and blocksize % block_k == 0,
        X_FP32=x.dtype == torch.float32,
        UPCAST_DOT=_interpreted(),
    )
    if split_k == 1:
        return out
    return out.sum(0).to(x.dtype)
