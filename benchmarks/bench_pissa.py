"""PiSSA initialization: ours (`qlora.nn.pissa.init_pissa`) against PEFT's, on one model.

Each arm runs in a fresh subprocess and times the initialization alone (the full-precision
model is loaded first, outside the timing): the split of every adapted Linear (r=16,
all-linear) with the exact SVD and with the randomized one (``pissa_niter`` 4). Ours also
quantizes the residual to nf4 (QPiSSA) inside its timing; PEFT's arms do not quantize. Peak
RSS is the process's VmHWM (load included).

    python benchmarks/bench_pissa.py [--model smollm2-135m] [--arms ours,ours-fast,peft,peft-fast]

Prints a table, the ratios ours / PEFT, and one JSON line; exits 0 whatever they are.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

ARMS = ("ours", "ours-fast", "peft", "peft-fast")
R, ALPHA, NITER = 16, 32, 4


def child(arm: str, model_name: str) -> dict[str, Any]:
    import torch

    import qlora
    from qlora.procinfo import peak_rss_bytes

    fast = arm.endswith("fast")
    model, _ = qlora.load_model(model_name, quant=None, tokenizer=False, progress=False)
    torch.manual_seed(0)
    start = time.perf_counter()
    if arm.startswith("ours"):
        from qlora.nn.pissa import init_pissa

        lora = qlora.LoraConfig(r=R, alpha=ALPHA, init="pissa", pissa_niter=NITER if fast else 0)
        qlora.add_lora(model, lora)
        report = init_pissa(model, lora, qlora.QuantConfig(kind="nf4"), progress=False)
        layers = len(report.layers)
    else:
        import peft

        init = f"pissa_niter_{NITER}" if fast else "pissa"
        config = peft.LoraConfig(
            r=R, lora_alpha=ALPHA, target_modules="all-linear", init_lora_weights=init
        )
        wrapped = peft.get_peft_model(model, config)
        layers = sum(1 for n, _ in wrapped.named_modules() if n.endswith("lora_A"))
    seconds = time.perf_counter() - start
    return {"arm": arm, "seconds": seconds, "layers": layers, "peak_mib": peak_rss_bytes() / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.model)))
        return
    rows = []
    for arm in [a for a in args.arms.split(",") if a]:
        command = [sys.executable, __file__, "--child", arm, "--model", args.model]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{arm} failed:\n{done.stderr[-2000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"  {arm}: {rows[-1]['seconds']:.2f} s", file=sys.stderr)
    print("| arm | layers | init s | peak RSS MiB |\n|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['arm']} | {row['layers']} | {row['seconds']:.2f} | {row['peak_mib']:.0f} |")
    by = {row["arm"]: row for row in rows}
    ratios = []
    for ours, theirs in (("ours", "peft"), ("ours-fast", "peft-fast")):
        if ours in by and theirs in by:
            ratio = by[ours]["seconds"] / by[theirs]["seconds"]
            ratios.append(f"{ours} / {theirs} init time: {ratio:.2f}x (ours includes nf4)")
    print("\n".join(ratios))
    print(json.dumps({"model": args.model, "rows": rows, "ratios": ratios}))


if __name__ == "__main__":
    main()
