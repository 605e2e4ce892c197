"""Does QLoRA match LoRA, and LoRA full fine-tuning? The QLoRA paper's claim at small scale.

The claim (Dettmers et al. 2023, Tables 3-4): fine-tuning over a frozen 4-bit NormalFloat
base with double quantization matches 16-bit LoRA, which matches full fine-tuning; FP4 falls
behind. This script fine-tunes the default model (SmolLM2-135M-Instruct) on two tasks with
the same budget (examples, steps, LR schedule, seeds) in every arm:

    full-fp32      every weight trains (lr 10x lower, as usual for full fine-tuning)
    lora-fp32      LoRA r=16 alpha=32 dropout 0.05 on every Linear, float32 base
    qlora-nf4-dq   the same adapters over an NF4 base with double quantization
    qlora-fp4 / qlora-int8 / qlora-nf2     other codebooks (all blocksize 64 + double quant)
    loftq-fp4 / loftq-nf2 / loftq-nf4-dq   the adapters start from the LoftQ fit of the
                   quantization error (``lora.init: loftq``) instead of B = 0
    qlora-nf4-dq-bf16   NF4 + DQ with the frozen base multiplying in bfloat16
    qlora-nf4-dq[-bf16]-lr0.3   the same pair at 0.3x the learning rate (on request, as is
                   loftq-nf4-dq): where reverse trains smoothly, bf16 against float32

Tasks: ``alpaca`` (the Stanford Alpaca subset given by ``--data``; a fixed 5% held out, its
first ``n_eval`` records scored by mean next-token loss on the responses) and ``reverse``
(the project's word-reversal task, generated here, scored by held-out loss and greedy exact
match). Each (task, arm, seed) runs in its own process (`quality_arm.py`), so its peak
resident memory is its own; results go to ``--out`` and the report (tables, a plot of
held-out loss over steps, a reading computed from the numbers) to ``--report``.

    python benchmarks/quality.py [--data ../shared/data/alpaca_4500.json] [--quick]
        [--tasks alpaca,reverse] [--arms ...] [--seeds 0] [--extra-seeds 1]
        [--loftq-iters 5]
        [--out out/quality] [--report docs/results.md] [--resume] [--report-only]

``--extra-seeds`` reruns the two arms the acceptance compares (lora-fp32, qlora-nf4-dq) with
more seeds to show the spread. LoftQ arms alternate ``--loftq-iters`` rounds.
``--resume`` keeps finished runs (a killed run continues).
``--quick`` is the same pipeline at a toy budget (minutes; for tests; its report goes to
``out/quality-quick``). Prints one JSON line at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality_arm import ARMS, Budget, run_arm

from qlora.files import atomic_write

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "alpaca_4500.json"
ON_REQUEST = ("loftq-nf4-dq", "qlora-nf4-dq-lr0.3", "qlora-nf4-dq-bf16-lr0.3")
DEFAULT_ARMS = tuple(a for a in ARMS if a not in ON_REQUEST)
COMPARED = ("lora-fp32", "qlora-nf4-dq", "qlora-nf4-dq-bf16")  # acceptance pairs: extra seeds

BUDGETS: dict[str, Budget] = {
    "alpaca": Budget(
        steps=12,
        batch_size=8,
        lr_lora=5e-4,
        lr_full=5e-5,
        warmup_steps=2,
        eval_every=6,
        n_eval=40,
    ),
    "reverse": Budget(
        steps=12,
        batch_size=8,
        lr_lora=1e-3,
        lr_full=1e-4,
        warmup_steps=2,
        eval_every=4,
        n_eval=40,
        max_new_tokens=12,
    ),
}
QUICK: dict[str, Budget] = {
    "alpaca": Budget(
        steps=2,
        batch_size=2,
        lr_lora=5e-4,
        lr_full=5e-5,
        warmup_steps=0,
        eval_every=1,
        n_eval=4,
        max_seq_len=96,
    ),
    "reverse": Budget(
        steps=2,
        batch_size=2,
        lr_lora=1e-3,
        lr_full=1e-4,
        warmup_steps=0,
        eval_every=1,
        n_eval=4,
        n_train=16,
        max_new_tokens=6,
    ),
}


def plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every (task, arm, seed) to run, in order: all arms at the main seeds, then extras."""
    budgets = QUICK if args.quick else BUDGETS
    runs = []
    for task in args.tasks:
        seeds = [(arm, s) for s in args.seeds for arm in args.arms]
        seeds += [(arm, s) for s in args.extra_seeds for arm in COMPARED if arm in args.arms]
        for arm, seed in seeds:
            runs.append(
                {
                    "task": task,
                    "arm": arm,
                    "seed": seed,
                    "budget": asdict(budgets[task]),
                    "data": str(args.data),
                    "out": str(Path(args.out) / task / arm / f"seed{seed}"),
                    "threads": args.threads,
                    "loftq_iters": args.loftq_iters,
                }
            )
    return runs


def _run(spec: dict[str, Any], log: Path) -> dict[str, Any]:
    """Run one arm in a fresh process; its output goes to ``log`` (tail shown on failure)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, env=os.environ.copy())
    result_path = Path(spec["out"]) / "result.json"
    if proc.returncode != 0 or not result_path.is_file():
        tail = log.read_text(errors="replace").strip().splitlines()[-5:]
        raise SystemExit(
            f"quality: {spec['task']}/{spec['arm']}/seed{spec['seed']} failed "
            f"(exit {proc.returncode}); last lines of {log}:\n" + "\n".join(tail)
        )
    return json.loads(result_path.read_text())


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="alpaca JSON file")
    parser.add_argument("--quick", action="store_true", help="toy budget (tests)")
    parser.add_argument("--tasks", default="alpaca,reverse")
    parser.add_argument("--arms", default=",".join(DEFAULT_ARMS))
    parser.add_argument("--seeds", default="0", help="seeds every arm runs")
    parser.add_argument(
        "--extra-seeds", default=None, help=f"more seeds for {COMPARED} (default 1; quick: none)"
    )
    parser.add_argument("--loftq-iters", type=int, default=5, help="LoftQ rounds (>= 1)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--report", type=Path, default=None)
    parser.add_argument("--resume", action="store_true", help="keep finished runs")
    parser.add_argument("--report-only", action="store_true", help="rebuild the report")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return args
    args.tasks = [t for t in args.tasks.split(",") if t]
    args.arms = [a for a in args.arms.split(",") if a]
    for task in args.tasks:
        if task not in BUDGETS:
            parser.error(f"unknown task {task!r}; choose from {', '.join(BUDGETS)}")
    for arm in args.arms:
        if arm not in ARMS:
            parser.error(f"unknown arm {arm!r}; choose from {', '.join(ARMS)}")
    args.seeds = [int(s) for s in args.seeds.split(",") if s != ""]
    if args.extra_seeds is None:
        args.extra_seeds = "" if args.quick else "1"
    args.extra_seeds = [int(s) for s in args.extra_seeds.split(",") if s != ""]
    if args.loftq_iters < 1:
        parser.error(f"--loftq-iters must be >= 1, got {args.loftq_iters}")
    name = "quality-quick" if args.quick else "quality"
    args.out = args.out or ROOT / "out" / name
    args.report = args.report or (
        ROOT / "out" / name / "results.md" if args.quick else ROOT / "docs" / "results.md"
    )
    if "alpaca" in args.tasks and not args.data.is_file():
        parser.error(f"--data {args.data}: no such file (the Alpaca JSON to fine-tune on)")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parse_args(argv)
    if args.child:
        run_arm(json.loads(args.child))
        return {}
    from quality_report import write_report

    runs = plan(args)
    results: list[dict[str, Any]] = []
    start = time.perf_counter()
    for i, spec in enumerate(runs):
        done = Path(spec["out"]) / "result.json"
        name = f"{spec['task']}/{spec['arm']}/seed{spec['seed']}"
        if (args.resume or args.report_only) and done.is_file():
            results.append(json.loads(done.read_text()))
            continue
        if args.report_only:
            continue
        elapsed = time.perf_counter() - start
        print(f"[{i + 1}/{len(runs)}] {name} ({elapsed / 60:.1f} min so far)", flush=True)
        result = _run(spec, Path(args.out) / "logs" / f"{name.replace('/', '-')}.log")
        results.append(result)
        print(
            f"    eval loss {result['eval_loss_before']:.4f} -> {result['eval_loss_after']:.4f}"
            + (
                f", exact match {result['accuracy_before']:.0%} -> {result['accuracy_after']:.0%}"
                if "accuracy_after" in result
                else ""
            )
            + f", peak {result['peak_rss_mib']:.0f} MiB, {result['seconds']:.0f} s",
            flush=True,
        )
    wall = time.perf_counter() - start
    if not results:
        raise SystemExit(f"quality: no results under {args.out}")
    summary_path = Path(args.out) / "results.json"
    summary_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(summary_path, json.dumps({"wall_seconds": wall, "quick": args.quick,
                                           "runs": results}))  # fmt: skip
    summary = write_report(results, args.report, quick=args.quick, data=args.data)
    print(f"report: {args.report}")
    line = {"benchmark": "quality", "quick": args.quick, "runs": len(results), **summary}
    print(json.dumps(line))
    return line


if __name__ == "__main__":
    main()
