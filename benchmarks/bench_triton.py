"""The Triton kernels on a CUDA GPU: dequantize bandwidth and fused matmul vs dequantize+matmul.

    python benchmarks/bench_triton.py [--peak-gbs 3350] [--repeats 50] [--double-quant]

(a) ``dequantize_triton`` of an nf4 weight (blocksize 64) to bfloat16, 4096×4096 and
    11008×4096: bytes moved (packed codes + float32 absmax read, bf16 output written) divided
    by the median time, next to the device's peak HBM bandwidth (``--peak-gbs``; the default
    3350 GB/s is an H100 SXM, use 2039 for an A100 80GB, 4800 for an H200).
(b) ``quantized_matmul_triton`` (fused) against ``x @ dequantize(state, bf16).T`` and against
    the same with a reused dequantize buffer (the unfused path at its best), for M ∈ {1, 4, 16}
    bf16 tokens, on 4096×4096, 11008×4096 and 4096×11008 weights. The ideal ratio for a
    memory-bound M is (2·2 + 0.5) / 0.5 = 9: the unfused path writes and reads a bf16 copy.

Times are medians of ``--repeats`` (≥ 20) calls measured with CUDA events after a warm-up.
With ``--double-quant`` the states are double-quantized and both paths undo it on every call
(``dequantize_absmax``); by default the scales are plain float32. Prints markdown tables and,
last, one JSON line with every number. Without a CUDA GPU it prints one line and exits 1.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable

import torch

from qlora.quant import dequantize, dequantize_reference, quantize
from qlora.quant.blockwise import dequantize_absmax
from qlora.quant.state import QuantState

DEQUANT_SHAPES = ((4096, 4096), (11008, 4096))
MATMUL_SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))
TOKENS = (1, 4, 16)
BLOCKSIZE = 64


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 10) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)


def bench_dequant(args: argparse.Namespace) -> list[dict[str, float]]:
    from qlora.kernels.triton_dequant import dequantize_triton

    rows = []
    print(f"\n### dequantize_triton nf4 → bf16 (blocksize {BLOCKSIZE})\n")
    print("| weight | MB moved | median ms | GB/s | % of peak |")
    print("|---|---:|---:|---:|---:|")
    for n, k in DEQUANT_SHAPES:
        state = quantize(torch.randn(n, k) * 0.02, "nf4", BLOCKSIZE, double_quant=False)
        state = state.to("cuda")
        absmax = state.absmax.float().contiguous()
        out = torch.empty(n * k, dtype=torch.bfloat16, device="cuda")
        dequantize_triton(state.packed, absmax, state.code, out, BLOCKSIZE, 4)
        assert torch.equal(out.view(n, k), dequantize_reference(state, torch.bfloat16))
        moved = state.packed.numel() + absmax.numel() * 4 + out.numel() * out.element_size()
        ms = median_ms(
            lambda: dequantize_triton(state.packed, absmax, state.code, out, BLOCKSIZE, 4),  # noqa: B023
            args.repeats,
        )
        gbs = moved / (ms * 1e-3) / 1e9
        pct = 100 * gbs / args.peak_gbs
        print(f"| {n}×{k} | {moved / 1e6:.1f} | {ms:.4f} | {gbs:.0f} | {pct:.0f}% |")
        rows.append({"n": n, "k": k, "mb": moved / 1e6, "ms": ms, "gbs": gbs, "pct_peak": pct})
    return rows


def bench_matmul(args: argparse.Namespace) -> list[dict[str, float]]:
    from qlora.kernels.triton_matmul import quantized_matmul_triton

    def fused(x: torch.Tensor, state: QuantState) -> torch.Tensor:
        n, k = state.shape
        absmax = dequantize_absmax(state) if state.nested is not None else state.absmax
        return quantized_matmul_triton(
            x, state.packed, absmax, state.code, n, k, state.blocksize, state.bits
        )

    rows = []
    dq = " + double quant" if args.double_quant else ""
    print(f"\n### fused nf4 matmul vs dequantize + matmul (bf16, blocksize {BLOCKSIZE}{dq})\n")
    print(
        "| weight N×K | M | fused ms | deq+mm ms | deq(out=)+mm ms | deq+mm / fused "
        "| fused GB/s | % of peak |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for n, k in MATMUL_SHAPES:
        state = quantize(torch.randn(n, k) * 0.02, "nf4", BLOCKSIZE, args.double_quant)
        state = state.to("cuda")
        buffer = torch.empty((n, k), dtype=torch.bfloat16, device="cuda")
        for m in TOKENS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            got = fused(x, state).float()
            want = x.float() @ dequantize(state, torch.float32).T
            scale = want.abs().max().item()
            torch.testing.assert_close(got, want, rtol=1.6e-2, atol=1.6e-2 * scale)
            fused_ms = median_ms(lambda: fused(x, state), args.repeats)  # noqa: B023
            unfused_ms = median_ms(
                lambda: x @ dequantize(state, torch.bfloat16).T,  # noqa: B023
                args.repeats,
            )
            reused_ms = median_ms(
                lambda: x @ dequantize(state, torch.bfloat16, out=buffer).T,  # noqa: B023
                args.repeats,
            )
            moved = (
                state.packed.numel()
                + state.absmax.numel() * state.absmax.element_size()
                + 2 * m * (n + k)
            )
            gbs = moved / (fused_ms * 1e-3) / 1e9
            pct = 100 * gbs / args.peak_gbs
            ratio = unfused_ms / fused_ms
            print(
                f"| {n}×{k} | {m} | {fused_ms:.4f} | {unfused_ms:.4f} | {reused_ms:.4f} "
                f"| {ratio:.2f}× | {gbs:.0f} | {pct:.0f}% |"
            )
            rows.append(
                {
                    "n": n,
                    "k": k,
                    "m": m,
                    "fused_ms": fused_ms,
                    "dequant_matmul_ms": unfused_ms,
                    "dequant_out_matmul_ms": reused_ms,
                    "ratio": ratio,
                    "fused_gbs": gbs,
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--peak-gbs", type=float, default=3350.0, help="peak HBM GB/s (H100 SXM: 3350)"
    )
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--double-quant", action="store_true")
    args = parser.parse_args()
    args.repeats = max(20, args.repeats)

    if not torch.cuda.is_available():
        sys.exit("bench_triton: needs a CUDA GPU (torch.cuda.is_available() is False); skipped")
    from qlora.kernels import kernels_disabled, triton_enabled

    if kernels_disabled():  # the unfused arm would time the PyTorch reference dequantize
        sys.exit("bench_triton: QLORA_DISABLE_KERNELS is set; unset it to time the kernels")
    if not triton_enabled():
        sys.exit("bench_triton: triton is not installed (pip install 'qlora[triton]'); skipped")

    torch.manual_seed(0)
    name = torch.cuda.get_device_name()
    print(
        f"device: {name} | peak {args.peak_gbs:.0f} GB/s (--peak-gbs) | torch {torch.__version__}"
    )
    summary = {
        "bench": "triton",
        "device": name,
        "peak_gbs": args.peak_gbs,
        "dequant": bench_dequant(args),
        "matmul": bench_matmul(args),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
