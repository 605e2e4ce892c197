"""Optimizer step time and state memory: torch AdamW, qlora.optim, bitsandbytes, one run.

Full fine-tuning of the default model (SmolLM2-135M-Instruct, all 134.5M parameters
trainable, fp32): every optimizer gets the same parameters and the same fixed random
gradients, each in its own subprocess so that one's memory cannot hide in another's heap.
A child loads the model, makes the gradients, records its resident set size, resets the
kernel's peak counter (``/proc/self/clear_refs``) and runs ``--steps`` optimizer steps. It
reports

* the first step (state allocation included) and the median of the later steps;
* ``peak growth``: peak RSS during the steps minus RSS before them - on a CPU, the memory the
  optimizer costs (state + temporaries); on CUDA (``--device cuda``) the growth of
  ``torch.cuda.max_memory_allocated``;
* the optimizer's logical state bytes.

Children run with glibc's mmap threshold pinned (``MALLOC_MMAP_THRESHOLD_=131072``) so freed
heap memory cannot be reused silently and hide an allocation. Paged qlora optimizers put
their state file in ``--state-dir`` (default: the system temp directory; use a disk).
bitsandbytes' paged optimizers use CUDA unified memory; on a CPU they fall back to ordinary
state (bitsandbytes warns), so their CPU numbers are its unpaged ones.

    python benchmarks/bench_optim.py [--steps 6] [--device cpu|cuda] [--only NAME ...]
                                     [--model smollm2-135m|DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

MiB = 2**20
OPTIMIZERS = {  # name: (who, what)
    "torch AdamW": ("peer", "torch"),
    "torch AdamW fused": ("peer", "torch-fused"),
    "bnb AdamW8bit": ("peer", "bnb-8bit"),
    "bnb PagedAdamW": ("peer", "bnb-paged"),
    "qlora AdamW8bit": ("ours", "adamw8bit"),
    "qlora PagedAdamW": ("ours", "paged_adamw"),
    "qlora PagedAdamW8bit": ("ours", "paged_adamw8bit"),
}


def _make(kind: str, params: list, state_dir: str, page_mb: int) -> Any:
    import torch

    lr, wd = 1e-5, 0.0
    if kind == "torch":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    if kind == "torch-fused":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd, fused=True)
    if kind.startswith("bnb"):
        import warnings

        import bitsandbytes as bnb

        warnings.simplefilter("ignore")  # "paged optimizers are not supported on CPU"
        cls = bnb.optim.AdamW8bit if kind == "bnb-8bit" else bnb.optim.PagedAdamW
        return cls(params, lr=lr, weight_decay=wd)
    from qlora.optim import build_optimizer

    return build_optimizer(
        kind, params, lr=lr, weight_decay=wd, page_bytes=page_mb * MiB, state_dir=state_dir
    )


def _state_bytes(opt: Any) -> int:
    import torch

    if hasattr(opt, "state_nbytes"):
        return int(opt.state_nbytes())
    return sum(
        t.numel() * t.element_size()
        for state in opt.state.values()
        for key, t in state.items()
        if torch.is_tensor(t) and t.dim() > 0 and not key.startswith("qmap")
    )


def child(
    kind: str, steps: int, device: str, state_dir: str, page_mb: int, model_name: str
) -> dict[str, Any]:
    import torch

    from qlora import load_model
    from qlora.procinfo import peak_rss_bytes, reset_peak_rss, rss_bytes

    model, _ = load_model(model_name, quant=None, tokenizer=False, progress=False)
    params = [p for p in model.to(device).parameters()]
    gen = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(device)
    opt = _make(kind, params, state_dir, page_mb)
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = rss_bytes()
        reset_peak_rss()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes()
    after = torch.cuda.memory_allocated() if cuda else rss_bytes()
    return {
        "params": sum(p.numel() for p in params),
        "first_step_s": times[0],
        "step_s": statistics.median(times[1:]) if steps > 1 else times[0],
        "peak_growth": peak - before,
        "held_after": after - before,
        "state_bytes": _state_bytes(opt),
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--state-dir", default=tempfile.gettempdir())
    parser.add_argument("--page-mb", type=int, default=64)
    parser.add_argument("--only", nargs="*", help="names (substring match) to run")
    parser.add_argument("--model", default="smollm2-135m", help="a model name or directory")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.device, args.state_dir,
                               args.page_mb, args.model)))  # fmt: skip
        return

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    results: dict[str, dict[str, Any]] = {}
    for name, (_, kind) in OPTIMIZERS.items():
        if args.only and not any(key.lower() in name.lower() for key in args.only):
            continue
        print(f"running {name} ...", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(dir=args.state_dir) as state_dir:
            done = subprocess.run(
                [sys.executable, __file__, "--child", kind, "--steps", str(args.steps),
                 "--device", args.device, "--state-dir", state_dir,
                 "--page-mb", str(args.page_mb), "--model", args.model],
                capture_output=True, text=True, env=env,
            )  # fmt: skip
        if done.returncode != 0:
            print(f"{name}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])

    base = results.get("torch AdamW")
    first = next(iter(results.values()), None)
    if first is None:
        raise SystemExit("no optimizer ran")
    where = "GPU memory (max allocated)" if args.device == "cuda" else "RSS"
    print(
        f"\n{first['params'] / 1e6:.1f}M trainable fp32 parameters, {args.device}, "
        f"{first['threads']} threads, median of {args.steps - 1} steps after the first; "
        f"paged page {args.page_mb} MiB\n"
    )
    print(
        f"| optimizer | step (s) | first step (s) | state bytes/param | peak {where} growth "
        "(MiB) | vs torch AdamW: time | vs torch AdamW: memory |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        ratio_t = f"{r['step_s'] / base['step_s']:.2f}x" if base else "-"
        ratio_m = f"{r['peak_growth'] / base['peak_growth']:.3f}x" if base else "-"
        print(
            f"| {name} | {r['step_s']:.3f} | {r['first_step_s']:.3f} | "
            f"{r['state_bytes'] / r['params']:.3f} | {r['peak_growth'] / MiB:.1f} | "
            f"{ratio_t} | {ratio_m} |"
        )
    pairs = [("qlora AdamW8bit", "bnb AdamW8bit"), ("qlora PagedAdamW", "bnb PagedAdamW")]
    for ours, theirs in pairs:
        if ours in results and theirs in results:
            a, b = results[ours], results[theirs]
            print(
                f"{ours} vs {theirs}: step time {b['step_s'] / a['step_s']:.2f}x faster, "
                f"peak memory growth {a['peak_growth'] / max(b['peak_growth'], 1):.3f}x"
            )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
