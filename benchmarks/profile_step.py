"""Where a training step's time goes: torch.profiler over one step, grouped by kind of work.

The bench_step workload (SmolLM2-135M, batch 4 × 256, LoRA r=16 α=32 dropout 0.05 on all
linear layers, AdamW) for one arm, profiled after two warm-up steps. Operators are grouped by
what they do, using their input shapes: matmuls with the rank r as a dimension are LoRA's,
those with the vocabulary size are the output head's, other matmuls are the frozen base
layers'; the rest by operator name. Self time, so nothing is counted twice.

    python benchmarks/profile_step.py [--arm ours-qlora|ours-lora|peft-qlora|peft-lora] [--ckpt]
                                      [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

RANK = 16
MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")


def _group(name: str, shapes: list, vocab: int) -> str:
    dims = {d for shape in shapes if isinstance(shape, list) for d in shape}
    if name in MATMULS:
        if vocab in dims:
            return "output head matmuls (logits, dL/dh)"
        if RANK in dims:
            return "LoRA matmuls (A, B; rank 16)"
        return "frozen base matmuls"
    if "bernoulli" in name or "dropout" in name:
        return "dropout (Bernoulli masks, multiplies)"
    if "scaled_dot_product" in name:
        return "attention (SDPA flash, fwd + bwd)"
    if "FusedLoRA" in name or "QuantMatmul" in name or "Dequant" in name:
        return "our autograd Functions' own work (dequantize, dropout kernels)"
    if "MatMul4Bit" in name or "dequantize" in name.lower():
        return "bitsandbytes 4-bit (dequantize)"
    if "Optimizer" in name or "adam" in name.lower() or "_foreach" in name:
        return "optimizer step"
    if any(k in name for k in ("logsumexp", "log_softmax", "exp", "nll_loss", "cross_entropy")):
        return "loss element-wise (softmax, log-sum-exp)"
    if "SwiGLU" in name or "silu" in name:
        return "SwiGLU (silu, product, their backward)"
    if name in ("aten::_to_copy", "aten::to", "aten::copy_"):
        return "dtype casts and copies"
    return "other element-wise, autograd bookkeeping"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arm", default="ours-qlora")
    parser.add_argument("--ckpt", action="store_true")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="compute dtype of the frozen base (bench_step's --dtypes)",
    )
    parser.add_argument("--model", default="smollm2-135m", help="a model name or directory")
    parser.add_argument("--top", type=int, default=0, help="also list the N costliest operators")
    args = parser.parse_args()

    import bench_step
    from torch.optim.optimizer import register_optimizer_step_post_hook
    from torch.profiler import ProfilerActivity, profile

    bench_args = argparse.Namespace(
        steps=args.steps,
        warmup=2,
        batch=4,
        seq_len=256,
        device="cpu",
        ours_train="{}",
        model=args.model,
        dtype=args.dtype,
    )
    prof = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
    steps_done = [0]

    def after_step(*_: object) -> None:
        # Both arms step one torch AdamW per training step: profiling starts after warm-up.
        steps_done[0] += 1
        if steps_done[0] == bench_args.warmup:
            prof.__enter__()

    register_optimizer_step_post_hook(after_step)
    runner = bench_step._ours if args.arm.startswith("ours") else bench_step._peft
    start = time.perf_counter()
    times, _ = runner(args.arm, args.ckpt, bench_args)
    prof.__exit__(None, None, None)
    captured: dict[str, float] = defaultdict(float)
    by_operator: dict[str, float] = defaultdict(float)
    vocab = 49152
    for event in prof.key_averages(group_by_input_shape=True):
        captured[_group(event.key, event.input_shapes, vocab)] += event.self_cpu_time_total / 1e6
        by_operator[event.key] += event.self_cpu_time_total / 1e6
    total = sum(captured.values())
    profiled_steps = len(times) - bench_args.warmup
    print(
        f"{args.arm}, grad ckpt {'on' if args.ckpt else 'off'}: {profiled_steps} profiled "
        f"step(s), {total / profiled_steps:.2f} s of operator self time per step "
        f"(unprofiled steps: {', '.join(f'{t:.2f}' for t in times[: bench_args.warmup])} s; "
        f"wall {time.perf_counter() - start:.0f} s)"
    )
    print("| work | s per step | share |")
    print("|---|---:|---:|")
    for group, seconds in sorted(captured.items(), key=lambda kv: -kv[1]):
        print(f"| {group} | {seconds / profiled_steps:.2f} | {seconds / total:.1%} |")
    if args.top:
        print(f"\n| operator (top {args.top}) | s per step | share |\n|---|---:|---:|")
        for name, seconds in sorted(by_operator.items(), key=lambda kv: -kv[1])[: args.top]:
            print(f"| {name} | {seconds / profiled_steps:.3f} | {seconds / total:.1%} |")


if __name__ == "__main__":
    main()
