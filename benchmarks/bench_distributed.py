"""Distributed training on this machine: world 1 with every core against torchrun world N.

The workload is the README's QLoRA recipe (``configs/qlora-alpaca.yaml``: the default model in
nf4 + DQ, r=16 on every linear layer) on the Alpaca subset in ``../shared/data`` (or, when it
is absent, on generated task data: the script says which), the same global batch in every
arm. The arms, each a fresh ``qlora train`` in its own process(es), in one invocation:

    world1   python -m qlora train, one process with OMP_NUM_THREADS = the cores given
    ddp2     torchrun --standalone --nproc-per-node 2 -m qlora train (train.parallel ddp),
             OMP_NUM_THREADS = cores / 2 per rank
    fsdp2    the same with train.parallel fsdp (the packed base sharded and all-gathered)

Per arm: the median optimizer-step time over the steps after the first (from metrics.jsonl's
``elapsed_s``), global examples per second from it, tokens per second as the trainer counts
them (every rank's, padding included), the loss of every step (the two worlds
walk the same examples: the losses agree to float32 summation order), and the peak resident
memory of the fullest rank (``memory_mb_max_rank``; rank 0's ``memory_mb`` at world 1).

    python benchmarks/bench_distributed.py [--steps 8] [--batch 4] [--cores 2] [--data F]

On CUDA machines the same command line runs NCCL ranks (one GPU each) when ``--device cuda``.
Prints a table, the ratio world N / world 1, and one JSON line; exits 0 whatever they are.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ALPACA = ROOT.parent / "shared" / "data" / "alpaca_4500.json"


def _data(requested: str | None, work: Path) -> tuple[list[str], str]:
    """``--set`` overrides for the data and a line saying what it is."""
    path = Path(requested) if requested else ALPACA
    if path.is_file():
        return [f"data.path={path}", "data.format=alpaca"], f"Alpaca subset ({path})"
    if requested:
        raise SystemExit(f"bench_distributed: --data {requested}: no such file")
    from qlora.data import make_task_dataset, write_jsonl

    records, _ = make_task_dataset(256, 0, seed=0)
    write_jsonl(records, work / "task.jsonl")
    note = f"generated task data ({ALPACA} is absent: the Alpaca subset is not in this checkout)"
    return [f"data.path={work / 'task.jsonl'}", "data.format=auto"], note


def _arm(
    world: int, parallel: str, args: argparse.Namespace, data: list[str], work: Path
) -> dict[str, Any]:
    out = work / f"{parallel}{world}"
    per_rank = args.batch // world
    overrides = [
        *data,
        f"train.parallel={parallel}",
        f"train.output_dir={out}",
        f"train.batch_size={per_rank}",
        "train.grad_accum=1",
        f"train.max_steps={args.steps}",
        "train.eval_every=0",
        "train.save_every=0",
        "data.eval_fraction=0",
        "data.max_seq_len=256",
        "lora.dropout=0",  # the worlds then walk identical computations: losses comparable
        f"model.device={args.device}",
    ]
    cli = ["-m", "qlora", "train", str(ROOT / "configs" / "qlora-alpaca.yaml")]
    cli += [arg for o in overrides for arg in ("--set", o)]
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}"]
    command = [sys.executable, *(launcher if world > 1 else []), *cli]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, args.cores // world)))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"world {world} failed:\n{done.stderr[-4000:]}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    times = [b["elapsed_s"] - a["elapsed_s"] for a, b in itertools.pairwise(steps)]
    step_s = statistics.median(times)
    # the trainer's cumulative count: every rank's tokens, padding included (each rank pads
    # its own slice, so world 2 carries less padding than world 1 on the same examples)
    seen = [r["tokens_per_s"] * r["elapsed_s"] for r in steps]
    tokens_per_s = (seen[-1] - seen[0]) / (steps[-1]["elapsed_s"] - steps[0]["elapsed_s"])
    return {
        "arm": f"{parallel}{world}" if world > 1 else "world1",
        "world": world,
        "threads_per_rank": max(1, args.cores // world),
        "batch_per_rank": per_rank,
        "step_s": step_s,
        "examples_per_s": args.batch / step_s,
        "tokens_per_s": tokens_per_s,
        "losses": [r["loss"] for r in steps],
        "peak_mb_max_rank": steps[-1].get("memory_mb_max_rank", steps[-1]["memory_mb"]),
        "allgather_mb_per_step": steps[-1].get("allgather_mb"),
        "allgather_vs_bf16": steps[-1].get("allgather_vs_bf16"),
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per arm")
    parser.add_argument("--batch", type=int, default=4, help="global batch (examples)")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--data", default=None, help="an Alpaca JSON (default: the shared one)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    if args.batch % 2:
        raise SystemExit("bench_distributed: --batch must be even (two ranks share it)")
    with tempfile.TemporaryDirectory(prefix="bench_distributed_") as tmp:
        work = Path(tmp)
        data, note = _data(args.data, work)
        arms = [(1, "auto"), (2, "ddp"), (2, "fsdp")]
        results = [_arm(world, parallel, args, data, work) for world, parallel in arms]
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")), "unknown CPU"
    )  # fmt: skip
    header = (
        f"{cpu}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; default model "
        f"nf4 + DQ, r=16 all-linear, dropout 0; global batch {args.batch}, max 256 tokens, "
        f"{args.steps} steps; data: {note}"
    )
    print(header)
    print("| arm | threads/rank | step s (median) | examples/s | tokens/s | fullest rank's peak "
          "RSS MiB | all-gathered MiB/step (x bf16 base) |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        gathered = (
            f"{r['allgather_mb_per_step']:.0f} ({r['allgather_vs_bf16']:.2f}x)"
            if r["allgather_mb_per_step"] is not None
            else "-"
        )
        speed = f"{r['step_s']:.2f} | {r['examples_per_s']:.2f} | {r['tokens_per_s']:.0f}"
        print(f"| {r['arm']} | {r['threads_per_rank']} | {speed} | "
              f"{r['peak_mb_max_rank']:.0f} | {gathered} |")  # fmt: skip
    one, ratios = results[0], []
    for other in results[1:]:
        drift = max(abs(a - b) for a, b in zip(one["losses"], other["losses"], strict=True))
        speed = other["examples_per_s"] / one["examples_per_s"]
        memory = other["peak_mb_max_rank"] / one["peak_mb_max_rank"]
        ratios += [
            f"{other['arm']} / world1 examples/s: {speed:.2f}x; peak memory per rank "
            f"{memory:.2f}x; largest per-step loss difference {drift:.2e}"
        ]
    print("\n".join(ratios))
    print(json.dumps({"header": header, "arms": results, "ratios": ratios}))


if __name__ == "__main__":
    main()
