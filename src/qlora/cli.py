"""`qlora` command line. Subcommands are thin layers over the library's public API."""

from __future__ import annotations

import argparse
import platform
import sys

__all__ = ["main"]


def _env(_: argparse.Namespace) -> int:
    """Print what this installation can use: versions, fast kernels, devices."""
    import torch

    import qlora
    from qlora.quant.dequant import cpu_kernel

    kernel = cpu_kernel()
    rows = {
        "qlora": qlora.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu threads": str(torch.get_num_threads()),
        "cpu dequant kernel": (
            ("avx2" if kernel.has_avx2() else "scalar") if kernel else "not built (reference path)"
        ),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
    }
    for name in ("transformers", "bitsandbytes", "peft", "triton"):
        try:
            module = __import__(name)
            rows[name] = getattr(module, "__version__", "installed")
        except ImportError:
            rows[name] = "not installed"
    width = max(map(len, rows))
    for key, value in rows.items():
        print(f"{key:<{width}}  {value}")
    return 0


def _estimate(args: argparse.Namespace) -> int:
    """Print the memory estimate for one model, a table across sizes, or the comparison."""
    from qlora.config import ConfigError
    from qlora.memory import compare_table, estimate, sizes_table

    settings = {
        "batch": args.batch,
        "seq_len": args.seq_len,
        "rank": args.rank,
        "optimizer": args.optim,
        "grad_ckpt": args.grad_ckpt,
        "compute_dtype": args.compute_dtype,
        "device": args.device,
        "chunked_loss": args.chunked_loss,
    }
    try:
        if args.compare_table:
            print(compare_table())
        elif args.sizes or args.model is None:
            ckpt = "gradient checkpointing" if args.grad_ckpt else "no checkpointing"
            loss = "chunked loss" if args.chunked_loss else "full logits"
            print(
                f"total GiB; batch {args.batch} x seq {args.seq_len}, r={args.rank}, "
                f"{args.optim}, {ckpt}, {loss}, {args.device or 'cuda'}"
            )
            print(sizes_table(**settings))
        else:
            print(estimate(args.model, args.method, **settings))
    except ConfigError as err:
        print(f"qlora estimate: error: {err}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    import qlora

    parser = argparse.ArgumentParser(
        prog="qlora", description="Fine-tune LLMs with LoRA and QLoRA on the hardware you have."
    )
    parser.add_argument("--version", action="version", version=f"qlora {qlora.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    env = commands.add_parser("env", help="show versions, fast kernels and devices")
    env.set_defaults(handler=_env)
    from qlora.memory import METHODS, OPTIMIZERS

    est = commands.add_parser(
        "estimate",
        help="estimate the memory of fine-tuning (weights, adapters, optimizer, activations)",
        description="Peak memory of one fine-tuning step; without --model, a table across sizes.",
    )
    est.add_argument("--model", help="size (7b, 13b, 70b, 8x7b, 135m, ...) or a config.json")
    est.add_argument("--method", choices=METHODS, default="qlora-4")
    est.add_argument("--batch", type=int, default=1)
    est.add_argument("--seq-len", type=int, default=512)
    est.add_argument("--rank", type=int, default=16)
    est.add_argument("--optim", choices=OPTIMIZERS, default="adamw")
    est.add_argument("--grad-ckpt", action=argparse.BooleanOptionalAction, default=False)
    est.add_argument(
        "--chunked-loss",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="our trainer's chunked loss (default); --no-chunked-loss: full logits",
    )
    est.add_argument("--compute-dtype", choices=("float32", "bfloat16", "float16"))
    est.add_argument("--device", choices=("cuda", "cpu"))
    est.add_argument("--sizes", action="store_true", help="table across sizes x methods")
    est.add_argument(
        "--compare-table",
        action="store_true",
        help="ours beside the published rule-of-thumb table (docs/memory.md)",
    )
    est.set_defaults(handler=_estimate)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
