"""Dequantize a 4096×4096 GGUF block tensor of every kind: our C kernel vs the torch reference
vs the gguf package's numpy, in one run.

    python benchmarks/bench_gguf_dequant.py [--size 4096] [--repeats 20] [--threads N]
                                            [--kinds q4_1,q8_0,...]

Per kind, random blocks with valid float16 scales are dequantized by every path; the results
are checked bit-identical before timing. Rows (median seconds after a warm-up, shown as
Mparam/s = million output elements per second):

* ``c f32 out=`` / ``c bf16 out=``  qlora.quant.gguf_blocks.dequantize_blocks into a reused
                                    buffer (what a frozen layer's forward does)
* ``c f32``                         the same, allocating its output
* ``torch ref f32``                 dequantize_blocks_reference (the pure-PyTorch oracle)
* ``gguf numpy f32``                gguf.quants.dequantize (the peer)
* ``write roofline``                ``out.fill_(1.0)`` on the float32 buffer: the write floor

The last line is one JSON object with every rate and the ratios C / reference, C / gguf.
"""

from __future__ import annotations

import argparse
import json
import platform
from collections.abc import Callable
from importlib.metadata import version

import gguf
import numpy as np
import torch
from timing import median_seconds

from qlora.kernels import c_extension, describe
from qlora.quant.gguf_blocks import (
    F16_SCALE_OFFSETS,
    GGUF_BLOCK_KINDS,
    block_shape,
    dequantize_blocks,
    dequantize_blocks_reference,
    ggml_type,
    row_bytes,
)


def random_blocks(kind: str, size: int, seed: int = 0) -> np.ndarray:
    """[size, row_bytes] uint8: random bytes, float16 scales set to small finite values."""
    rng = np.random.default_rng(seed)
    elements, nbytes = block_shape(kind)
    nblocks = size * size // elements
    raw = rng.integers(0, 256, (nblocks, nbytes), dtype=np.uint8)
    for offset in F16_SCALE_OFFSETS[kind]:
        scale = (rng.standard_normal(nblocks) * 0.01).astype(np.float16)
        raw[:, offset : offset + 2] = scale.view(np.uint8).reshape(nblocks, 2)
    return raw.reshape(size, row_bytes(kind, size))


def bench_kind(kind: str, size: int, repeats: int) -> dict[str, float]:
    raw = random_blocks(kind, size)
    blocks = torch.from_numpy(raw)
    shape = (size, size)
    expected = torch.from_numpy(gguf.quants.dequantize(raw, ggml_type(kind)))
    assert torch.equal(dequantize_blocks(blocks, kind, shape), expected), kind
    assert torch.equal(dequantize_blocks_reference(blocks, kind, shape), expected), kind
    out32 = torch.empty(shape)
    out16 = torch.empty(shape, dtype=torch.bfloat16)
    assert torch.equal(dequantize_blocks(blocks, kind, shape, torch.bfloat16), expected.bfloat16())
    rows: dict[str, tuple[Callable[[], object], int]] = {
        "c f32 out=": (lambda: dequantize_blocks(blocks, kind, shape, out=out32), repeats),
        "c bf16 out=": (
            lambda: dequantize_blocks(blocks, kind, shape, torch.bfloat16, out=out16),
            repeats,
        ),
        "c f32": (lambda: dequantize_blocks(blocks, kind, shape), repeats),
        "torch ref f32": (lambda: dequantize_blocks_reference(blocks, kind, shape), 3),
        "gguf numpy f32": (lambda: gguf.quants.dequantize(raw, ggml_type(kind)), 3),
        "write roofline": (lambda: out32.fill_(1.0), repeats),
    }
    params = size * size / 1e6
    return {row: params / median_seconds(fn, n) for row, (fn, n) in rows.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--kinds", default=",".join(GGUF_BLOCK_KINDS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kinds = args.kinds.split(",")

    kernel = c_extension("gguf")
    f16c = kernel.has_f16c() if kernel is not None else False
    flags = describe()["cpu features"].split()
    print(
        f"GGUF dequantize {args.size}x{args.size} | {platform.processor() or platform.machine()}"
        f" | {args.threads} threads | gguf {version('gguf')}"
        f" | c kernel {'on' if kernel else 'OFF (reference path)'}"
        f" (code path: {'avx2' if 'avx2' in flags else 'baseline'}, f16 out via "
        f"{'f16c' if f16c else 'scalar'})"
    )
    print(f"cpu flags that matter: {' '.join(flags) or 'unknown'}")
    results = {kind: bench_kind(kind, args.size, args.repeats) for kind in kinds}
    header = next(iter(results.values()))
    print("Mparam/s (million output elements per second; higher is better)")
    print(f"{'kind':<6}" + "".join(f"{row:>16}" for row in header) + f"{'c/ref':>8}{'c/gguf':>8}")
    summary: dict[str, object] = {
        "bench": "gguf_dequant",
        "size": args.size,
        "threads": args.threads,
        "cpu_flags": flags,
    }
    for kind, rates in results.items():
        vs_ref = rates["c f32 out="] / rates["torch ref f32"]
        vs_gguf = rates["c f32 out="] / rates["gguf numpy f32"]
        print(
            f"{kind:<6}"
            + "".join(f"{rate:>16.0f}" for rate in rates.values())
            + f"{vs_ref:>7.1f}x{vs_gguf:>7.1f}x"
        )
        summary[kind] = {
            **{row.replace(" ", "_").replace("=", ""): round(v, 1) for row, v in rates.items()},
            "c_vs_reference": round(vs_ref, 2),
            "c_vs_gguf": round(vs_gguf, 2),
        }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
