"""The key numbers of one benchmark's log, for `gpu_check.sh`'s summary.

    python benchmarks/gpu_check_summary.py triton|step|optim LOG [NOTE]

Reads the JSON line the benchmark printed last and prints a few indented lines. Exit status
1 when the log has no JSON line, 3 when the benchmark reported a part that failed (bench_optim
goes on past an optimizer that fails and names it in its log).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["last_json", "summarize"]

INDENT = "\n" + " " * 26


def last_json(text: str) -> Any:
    """The last line of ``text`` that parses as a JSON object."""
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    raise ValueError("no JSON line in the log")


def _triton(data: dict[str, Any]) -> list[str]:
    peak = data["peak_gbs"]
    dequant = ", ".join(
        f"{r['n']}x{r['k']} {r['gbs']:.0f} GB/s ({r['pct_peak']:.0f}% of {peak:.0f})"
        for r in data["dequant"]
    )
    shapes: dict[str, list[str]] = {}
    for r in data["matmul"]:
        shapes.setdefault(f"{r['n']}x{r['k']}", []).append(f"M={r['m']} {r['ratio']:.1f}x")
    fused = "; ".join(f"{shape}: {', '.join(v)}" for shape, v in shapes.items())
    return [
        f"dequantize nf4->bf16: {dequant}",
        f"fused decode speedup over dequantize+matmul: {fused}",
    ]


def _step(data: dict[str, Any]) -> list[str]:
    lines = [
        f"{r['arm']}{' +ckpt' if r['ckpt'] else ''}: {r['step_s'] * 1e3:.1f} ms/step, "
        f"{r['tokens_per_s']:.0f} tok/s, peak {r['peak_mib']:.0f} MiB"
        for r in data["rows"]
    ]
    return lines + list(data.get("ratios", []))


def _optim(data: dict[str, Any]) -> list[str]:
    return [
        f"{name}: {r['step_s'] * 1e3:.1f} ms/step, peak growth {r['peak_growth'] / 2**20:.0f} "
        f"MiB, state {r['state_bytes'] / r['params']:.2f} B/param"
        for name, r in data.items()
    ]


SUMMARIES = {"triton": _triton, "step": _step, "optim": _optim}


def summarize(kind: str, text: str) -> tuple[list[str], list[str]]:
    """(summary lines, lines of parts that failed) of a benchmark log."""
    if kind not in SUMMARIES:
        raise ValueError(f"unknown benchmark kind {kind!r}; choose one of {sorted(SUMMARIES)}")
    failed = [line for line in text.splitlines() if line.endswith(": failed")]
    return SUMMARIES[kind](last_json(text)), failed


def main() -> int:
    kind, log = sys.argv[1], Path(sys.argv[2])
    note = sys.argv[3] if len(sys.argv) > 3 else ""
    try:
        lines, failed = summarize(kind, log.read_text(errors="replace"))
    except (OSError, ValueError, KeyError, TypeError) as err:
        print(f"{type(err).__name__}: {err}")
        return 1
    lines += [f"FAILED: {line}" for line in failed]
    print(INDENT.join(lines) + (f"{INDENT}({note})" if note else ""))
    return 3 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
