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


def build_parser() -> argparse.ArgumentParser:
    import qlora

    parser = argparse.ArgumentParser(
        prog="qlora", description="Fine-tune LLMs with LoRA and QLoRA on the hardware you have."
    )
    parser.add_argument("--version", action="version", version=f"qlora {qlora.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    env = commands.add_parser("env", help="show versions, fast kernels and devices")
    env.set_defaults(handler=_env)
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
