"""QLoRA training steps on a Llama-2-7B-shaped model on this CPU: peak memory and step time.

The model is the synthetic checkpoint of ``synthetic_checkpoint.py`` (Llama-2-7B's exact
tensor shapes, random bf16 values; written once, ~13.5 GB on disk, ~26 GB for 13B): what a
training step costs in memory and time depends on the shapes, not on the values. The run is
what a user would do:

    qlora.load_model(dir, quant="nf4", double_quant=True)   # streamed, quantized on the fly
    qlora.add_lora(r=16, alpha=32, dropout=0.05, all-linear) # 40.0M trainable for 7B
    qlora.train(batch 1 x 512 tokens, gradient checkpointing, --optim)

in this process, and reports the peak resident set of the whole process (``VmHWM``: imports,
loading, and the steps) against the target (6 GB for 7B - the figure commonly published
for 7B QLoRA on a GPU -, 12 GB for 13B), the load time and the time of each step.

    python benchmarks/bench_7b.py [--size 7b|13b|tiny] [--steps 2] [--optim paged_adamw]
                                  [--pissa NITER]

``--pissa NITER`` starts the adapters with QPiSSA instead (``lora.init: pissa``; NITER 0 the
exact SVD, n > 0 the randomized one): each weight is split as it streams in and the residual
quantized (`qlora.nn.pissa.PissaSplit`), so the same peak target holds; the load time then
includes the splits.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

TARGET_GB = {"7b": 6.0, "13b": 12.0, "tiny": 1.0}
GB = 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(TARGET_GB), default="7b")
    parser.add_argument("--dir", help="an existing checkpoint directory instead of synthetic")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument(
        "--optim", default="paged_adamw", help="train.optim (QLoRA uses paged AdamW)"
    )
    parser.add_argument("--pissa", type=int, default=None, metavar="NITER")
    args = parser.parse_args()

    start = time.perf_counter()
    import torch

    import qlora
    from qlora.procinfo import peak_rss_bytes, rss_bytes

    if args.dir:
        directory = Path(args.dir)
    else:
        from synthetic_checkpoint import synthetic_checkpoint

        directory = synthetic_checkpoint(args.size)
    import_rss = rss_bytes()
    split = None
    if args.pissa is not None:
        from qlora.nn.pissa import PissaSplit

        lora = qlora.LoraConfig(r=16, alpha=32, dropout=0.05, init="pissa", pissa_niter=args.pissa)
        split = PissaSplit(lora, seed=0)
    model, _ = qlora.load_model(
        directory, quant="nf4", double_quant=True, tokenizer=False, split=split
    )
    load_s = model.qlora_load_info.seconds
    if split is not None:
        split.finish(model)
    load_peak = peak_rss_bytes()
    if split is None:
        torch.manual_seed(0)
        qlora.add_lora(model, qlora.LoraConfig(r=16, alpha=32, dropout=0.05))
    trainable = qlora.trainable_report(model)
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(args.steps):
        ids = torch.randint(
            0, model.config.vocab_size, (args.batch, args.seq_len), generator=generator
        )
        batches.append({"input_ids": ids, "labels": ids.clone()})
    step_times, losses = [], []
    if batches:  # --steps 0: loading (and the PiSSA split) only
        with tempfile.TemporaryDirectory() as out:
            config = qlora.TrainConfig(
                output_dir=out,
                batch_size=args.batch,
                max_steps=args.steps,
                warmup_steps=0,
                grad_ckpt=True,
                optim=args.optim,
            )
            result = qlora.train(model, config, batches)
        elapsed = [h["elapsed_s"] for h in result.history if "elapsed_s" in h]
        step_times = [b - a for a, b in zip([0.0, *elapsed[:-1]], elapsed, strict=True)]
        losses = [h["loss"] for h in result.history if "loss" in h]
    peak = peak_rss_bytes()
    target = TARGET_GB[args.size]
    row = {
        "size": args.size,
        "trainable_params": trainable.trainable,
        "quantized_bytes": model.qlora_load_info.quantized_bytes,
        "full_precision_bytes": model.qlora_load_info.full_precision_bytes,
        "import_rss_gb": import_rss / GB,
        "load_s": load_s,
        "load_peak_gb": load_peak / GB,
        "step_s": step_times,
        "tokens_per_s": [args.batch * args.seq_len / t for t in step_times],
        "losses": losses,
        "peak_rss_gb": peak / GB,
        "peak_rss_gib": peak / 2**30,
        "target_gb": target,
        "optim": args.optim,
        "pissa_niter": args.pissa,
        "wall_s": time.perf_counter() - start,
    }
    print(
        f"{args.size}: {'QPiSSA' if split else 'QLoRA'} nf4+DQ, r=16 all-linear "
        f"({trainable.trainable / 1e6:.1f}M trainable), "
        f"grad ckpt, batch {args.batch} x {args.seq_len}, optim {args.optim}"
    )
    print(
        f"  load {load_s:.1f} s (peak so far {load_peak / GB:.2f} GB); steps "
        + ", ".join(f"{t:.1f} s" for t in step_times)
        + (f" ({row['tokens_per_s'][-1]:.1f} tokens/s)" if step_times else "none")
    )
    verdict = "PASS" if peak / GB <= target else "FAIL"
    print(
        f"  peak RSS {peak / GB:.2f} GB ({peak / 2**30:.2f} GiB), whole process; "
        f"target <= {target:.0f} GB: {verdict}"
    )
    print(json.dumps(row))


if __name__ == "__main__":
    main()
