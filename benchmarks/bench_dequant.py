"""Dequantize (and quantize) a 4096×4096 NF4+DQ weight: ours vs bitsandbytes, in one run.

    python benchmarks/bench_dequant.py [--size 4096] [--repeats 30] [--threads N]

Both libraries quantize the same weight (the bytes are identical; checked before timing) and
dequantize it to float32 and to bfloat16. Rows:

* ``bnb``            bitsandbytes.functional.dequantize_4bit (allocates its output: its CPU
                     backend has no ``out=``)
* ``ours``           qlora.quant.dequantize, allocating like bnb
* ``ours out=``      qlora.quant.dequantize into a reused buffer (what QuantLinear does)
* ``torch reference`` our slow oracle (`dequantize_reference`)
* ``write roofline`` ``out.fill_(1.0)`` on the same buffer: the memory-write floor
* ``alloc+write floor`` ``torch.empty(...).fill_(1.0)``: the floor for any dequantize that
                     returns a fresh tensor (a large allocation is fresh pages from the OS,
                     so every 4 KiB page faults on first touch)

Timings are medians over ``--repeats`` calls after a warm-up. The last line is one JSON
object with every median and the ratios bnb / ours.
"""

from __future__ import annotations

import argparse
import json
import platform

import torch
from timing import median_seconds

from qlora.kernels import c_extension
from qlora.quant import dequantize, dequantize_reference, quantize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import bitsandbytes
    import bitsandbytes.functional as bnbf

    torch.manual_seed(0)
    weight = torch.randn(args.size, args.size) * 0.02
    results: dict[str, dict[str, float]] = {}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        w = weight.to(dtype)
        packed, bnb_state = bnbf.quantize_4bit(
            w, blocksize=64, quant_type="nf4", compress_statistics=True
        )
        ours = quantize(w, "nf4", blocksize=64, double_quant=True)
        assert torch.equal(packed.view(-1), ours.packed), "packed bytes differ from bitsandbytes"
        expected = bnbf.dequantize_4bit(packed, bnb_state)
        assert torch.equal(dequantize(ours), expected), "dequantized values differ"
        out = torch.empty(w.shape, dtype=dtype)
        rows = {
            "bnb": lambda: bnbf.dequantize_4bit(packed, bnb_state),  # noqa: B023
            "ours": lambda: dequantize(ours),  # noqa: B023
            "ours out=": lambda: dequantize(ours, out=out),  # noqa: B023
            "torch reference": lambda: dequantize_reference(ours),  # noqa: B023
            "write roofline": lambda: out.fill_(1.0),  # noqa: B023
            "alloc+write floor": lambda: torch.empty(w.shape, dtype=dtype).fill_(1.0),  # noqa: B023
        }
        repeats = {"torch reference": max(3, args.repeats // 5)}
        results[name] = {
            row: median_seconds(fn, repeats.get(row, args.repeats)) for row, fn in rows.items()
        }

    kernel = "on" if c_extension("cpu") else "OFF (reference path)"
    print(
        f"dequantize nf4+DQ {args.size}x{args.size} | {platform.processor() or platform.machine()}"
        f" | {args.threads} threads | bitsandbytes {bitsandbytes.__version__} | "
        f"cpu kernel {kernel}"
    )
    print(f"{'path':<18}" + "".join(f"{d + ' ms':>14}" for d in results))
    for row in next(iter(results.values())):
        print(f"{row:<18}" + "".join(f"{results[d][row] * 1e3:>14.2f}" for d in results))
    summary: dict[str, object] = {"bench": "dequant", "size": args.size, "threads": args.threads}
    for dtype_name, rows in results.items():
        bnb_time = rows["bnb"]
        fresh = bnb_time / rows["ours"]
        reused = bnb_time / rows["ours out="]
        print(
            f"{dtype_name}: bnb/ours = {fresh:.2f}x (both allocating), "
            f"{reused:.2f}x (ours into a reused buffer); "
            f"ours out= is {rows['ours out='] / rows['write roofline']:.2f}x the write roofline; "
            f"bnb is {bnb_time / rows['alloc+write floor']:.2f}x the alloc+write floor, so no "
            f"allocating dequantize can beat it by more than that"
        )
        summary[dtype_name] = {
            **{k.replace(" ", "_").replace("=", ""): round(v * 1e3, 3) for k, v in rows.items()},
            "speedup_vs_bnb": round(fresh, 2),
            "speedup_vs_bnb_reused_out": round(reused, 2),
        }
    # Quantizing (what loading a checkpoint spends its time on): float32 input, nf4 + DQ.
    quant_rows = {
        "bnb quantize_4bit": lambda: bnbf.quantize_4bit(
            weight, blocksize=64, quant_type="nf4", compress_statistics=True
        ),
        "ours quantize": lambda: quantize(weight, "nf4", 64, True),
        "ours reference": lambda: quantize(weight, "nf4", 64, True, reference=True),
    }
    quant_repeats = max(3, args.repeats // 5)
    quant_times = {row: median_seconds(fn, quant_repeats) for row, fn in quant_rows.items()}
    print(f"quantize nf4+DQ {args.size}x{args.size} float32 (median of {quant_repeats}):")
    for row, seconds in quant_times.items():
        print(f"  {row:<18}{seconds * 1e3:>10.1f} ms")
    ours_q = quant_times["ours quantize"]
    print(
        f"  bnb/ours = {quant_times['bnb quantize_4bit'] / ours_q:.2f}x, "
        f"reference/ours = {quant_times['ours reference'] / ours_q:.2f}x"
    )
    summary["quantize_ms"] = {
        k.replace(" ", "_"): round(v * 1e3, 2) for k, v in quant_times.items()
    }
    summary["quantize_speedup_vs_bnb"] = round(quant_times["bnb quantize_4bit"] / ours_q, 2)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
