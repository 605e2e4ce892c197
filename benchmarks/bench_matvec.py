"""Few-row quantized matmul: the fused C kernel vs dequantize-then-matmul vs dense, in one run.

    python benchmarks/bench_matvec.py [--kinds nf4,fp4,nf2,int8] [--rows 1,4,8,16,32]
                                      [--shapes 576x576,...] [--repeats 20] [--threads N]
                                      [--old PATH/_matvec.so]

For each kind (double quantization on, blocksize 64: the default base) and weight shape
[out, in] (the default model's layers and two 7B shapes), and each row count M:

* ``fused``      qlora.quant.matvec.quantized_matmul_few (absmax of a double-quant state
                 dequantized on every call, as a caller without a cache pays)
* ``kernel``     the C kernel alone, fp32 absmax precomputed (what a cached caller pays);
                 also run above MATVEC_MAX_ROWS to find the crossover
* ``kernel_dq``  the C kernel alone, the double-quantized scales decoded inside it (what
                 quantized_matmul_few runs, without its Python overhead)
* ``old_dq``     with ``--old``: ``kernel_dq`` of another build of matvec.c (e.g. the previous
                 commit's), loaded from its .so next to ours, so both run in one process and the
                 ratio old_dq / kernel_dq is measured under the same load. Build it with
                 ``git show HEAD:src/qlora/kernels/matvec.c > /tmp/old/matvec.c`` and
                 ``cc -O3 -fopenmp -std=c11 -fno-math-errno -fPIC -shared
                 -I$(python -c "import sysconfig; print(sysconfig.get_paths()['include'])")
                 /tmp/old/matvec.c -o /tmp/old/_matvec.so``
* ``deq+mm``     our current path: qlora.nn.qlinear.dequantize_for_matmul + x @ Wᵀ
* ``dense``      x @ Wᵀ with a float32 W of the same shape (no quantization at all)

Medians over ``--repeats`` calls after a warm-up (the kernel arms: the best of 3 such medians,
interleaved, since other jobs share small machines). GB/s counts the quantized weight bytes
(codes + stored scales) for the quantized arms and the float32 weight bytes for ``dense``.
The crossover per kind and shape is the smallest M at which deq+mm beats the kernel. The last
line is one JSON object with every median.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
from collections.abc import Callable
from types import ModuleType

import torch
from timing import median_seconds

from qlora.kernels import c_extension
from qlora.nn.qlinear import dequantize_for_matmul
from qlora.quant import quantize
from qlora.quant.blockwise import dequantize_absmax
from qlora.quant.matvec import MATVEC_MAX_ROWS, quantized_matmul_few
from qlora.quant.state import QuantState

DEFAULT_SHAPES = "576x576,1536x576,576x1536,192x576,4096x4096,11008x4096"


def kernel_call(state: QuantState, absmax: torch.Tensor) -> Callable[[torch.Tensor], object]:
    """The C kernel with a precomputed fp32 absmax, for any M (no row limit)."""
    kernel = c_extension("matvec")
    assert kernel is not None, "qlora.kernels._matvec is not built"
    out, inp = int(state.shape[0]), int(state.shape[1])
    code = state.code.float().contiguous()

    def call(x: torch.Tensor) -> torch.Tensor:
        y = torch.empty(x.shape[0], out)  # [M, out]
        kernel.matmul(
            x.data_ptr(), state.packed.data_ptr(), absmax.data_ptr(), code.data_ptr(),
            y.data_ptr(), x.shape[0], out, inp, state.blocksize, state.bits,
            torch.get_num_threads(),
        )  # fmt: skip
        return y

    return call


def load_old(path: str) -> ModuleType:
    """Another build of matvec.c (its module is also named _matvec), for ``old_dq``."""
    spec = importlib.util.spec_from_file_location("_matvec", path)
    if not os.path.isfile(path) or spec is None or spec.loader is None:
        raise ValueError(f"--old {path}: not a loadable extension module; pass a _matvec*.so")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def double_quant_call(state: QuantState, kernel: ModuleType) -> Callable[[torch.Tensor], object]:
    """``kernel`` (ours or an old build) decoding a double-quantized state's scales itself, the
    argument tuple built once (no Python overhead but the call)."""
    nested = state.nested
    assert nested is not None and state.absmax.dtype == torch.uint8, "needs double quantization"
    out, inp = int(state.shape[0]), int(state.shape[1])
    keep = (state.code.float().contiguous(), nested.code.float(), nested.absmax.float())

    def call(x: torch.Tensor) -> torch.Tensor:
        y = torch.empty(x.shape[0], out)  # [M, out]
        kernel.matmul(
            x.data_ptr(), state.packed.data_ptr(), 0, keep[0].data_ptr(), y.data_ptr(),
            x.shape[0], out, inp, state.blocksize, state.bits, torch.get_num_threads(), -1,
            state.absmax.data_ptr(), keep[1].data_ptr(), keep[2].data_ptr(),
            float(nested.offset), nested.blocksize,
        )  # fmt: skip
        return y

    return call


def best_of_interleaved(
    arms: dict[str, Callable[[torch.Tensor], object]], x: torch.Tensor, repeats: int
) -> dict[str, float]:
    """The best of 3 medians per arm, the arms taking turns (a shared machine's load then
    falls on all of them alike)."""
    best = {arm: float("inf") for arm in arms}
    for _ in range(3):
        for arm, fn in arms.items():
            best[arm] = min(best[arm], median_seconds(lambda fn=fn: fn(x), repeats))
    return best


def bench_shape(
    kind: str, out: int, inp: int, rows: list[int], repeats: int, old: ModuleType | None
) -> list[dict[str, float | int | str]]:
    torch.manual_seed(0)
    weight = torch.randn(out, inp) * 0.02  # [out, in]
    state = quantize(weight, kind, 64, True)
    absmax = dequantize_absmax(state).float().contiguous()
    ours = c_extension("matvec")
    assert ours is not None, "qlora.kernels._matvec is not built"
    kernels: dict[str, Callable[[torch.Tensor], object]] = {
        "kernel": kernel_call(state, absmax),
        "kernel_dq": double_quant_call(state, ours),
    }
    if old is not None:
        kernels["old_dq"] = double_quant_call(state, old)
    qbytes = state.packed.numel() + state.absmax.numel() * state.absmax.element_size()
    results = []
    for m in rows:
        x = torch.randn(m, inp)  # [M, in]
        arms: dict[str, Callable[[torch.Tensor], object]] = {
            "deq+mm": lambda x: x @ dequantize_for_matmul(state, torch.float32).t(),
            "dense": lambda x: x @ weight.t(),
        }
        if m <= MATVEC_MAX_ROWS:
            arms["fused"] = lambda x: quantized_matmul_few(x, state)
        times = {arm: median_seconds(lambda fn=fn, x=x: fn(x), repeats) for arm, fn in arms.items()}
        times.update(best_of_interleaved(kernels, x, repeats))
        row: dict[str, float | int | str] = {"kind": kind, "shape": f"{out}x{inp}", "m": m}
        for arm, seconds in times.items():
            row[f"{arm}_us"] = round(seconds * 1e6, 1)
            nbytes = weight.numel() * 4 if arm == "dense" else qbytes
            row[f"{arm}_gbs"] = round(nbytes / seconds / 1e9, 2)
        results.append(row)
    return results


def crossover(rows: list[dict[str, float | int | str]]) -> int | None:
    """The smallest M at which deq+mm is faster than the kernel (None: the kernel always wins)."""
    for row in rows:
        if float(row["deq+mm_us"]) < float(row["kernel_us"]):
            return int(row["m"])
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default="nf4,fp4,nf2,int8")
    parser.add_argument("--rows", default="1,4,8,16,32")
    parser.add_argument("--shapes", default=DEFAULT_SHAPES)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--old", default=None, help="another build's _matvec .so: arm old_dq")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    old = load_old(args.old) if args.old else None
    kernel = c_extension("matvec")
    rows = [int(m) for m in args.rows.split(",")]
    shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",")]
    print(
        f"cpu path: {kernel.best_path() if kernel else 'not built'}; threads {args.threads}; "
        f"{platform.processor() or platform.machine()}; MATVEC_MAX_ROWS {MATVEC_MAX_ROWS}"
    )
    header = f"{'kind':5} {'shape':>10} {'M':>3} | {'fused':>9} {'kernel':>9} {'kernel_dq':>9} "
    header += f"{'old_dq':>9} {'deq+mm':>9} {'dense':>9} (us) | kernel GB/s | deq+mm/kernel"
    header += " | old_dq/kernel_dq"
    print(header)
    everything = []
    crossovers = {}
    for kind in args.kinds.split(","):
        for out, inp in shapes:
            results = bench_shape(kind, out, inp, rows, args.repeats, old)
            for r in results:
                fused = f"{r['fused_us']:9.1f}" if "fused_us" in r else f"{'-':>9}"
                old_us = f"{r['old_dq_us']:9.1f}" if "old_dq_us" in r else f"{'-':>9}"
                speedup = (
                    f"{float(r['old_dq_us']) / float(r['kernel_dq_us']):6.2f}x" if old else "-"
                )
                print(
                    f"{kind:5} {r['shape']:>10} {r['m']:>3} | {fused} {r['kernel_us']:9.1f} "
                    f"{r['kernel_dq_us']:9.1f} {old_us} {r['deq+mm_us']:9.1f} "
                    f"{r['dense_us']:9.1f}      | {r['kernel_gbs']:11.2f} "
                    f"| {float(r['deq+mm_us']) / float(r['kernel_us']):6.2f}x | {speedup}"
                )
            crossovers[f"{kind} {out}x{inp}"] = crossover(results)
            everything += results
    print("crossover M (deq+mm first faster):", crossovers)
    print(json.dumps({"threads": args.threads, "crossover": crossovers, "results": everything}))


if __name__ == "__main__":
    main()
