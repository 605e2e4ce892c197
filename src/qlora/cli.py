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


def _add_model_args(sub: argparse.ArgumentParser, quant_default: str = "nf4") -> None:
    sub.add_argument(
        "--model", default="smollm2-135m", help="registered name, HF directory or .gguf file"
    )
    sub.add_argument(
        "--quant",
        default=quant_default,
        choices=("nf4", "fp4", "int8", "nf2", "none"),
        help="how to store the base's Linear weights (default %(default)s)",
    )
    sub.add_argument("--adapter", action="append", default=[], help="a LoRA adapter directory")


def _load(args: argparse.Namespace, tokenizer: bool = True) -> tuple:
    from qlora.models import load_model

    quant = None if args.quant == "none" else args.quant
    model, tok = load_model(args.model, quant=quant, tokenizer=tokenizer)
    for directory in args.adapter:
        from qlora.adapters import load_adapter

        load_adapter(model, directory)
    return model, tok


def _generation_kwargs(args: argparse.Namespace) -> dict:
    return {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
    }


def _generate(args: argparse.Namespace) -> int:
    """Prompt -> text, streamed to the terminal."""
    from qlora.generate import generate_text

    model, tok = _load(args)
    messages = [{"role": "user", "content": args.prompt}]
    generate_text(model, tok, messages, raw=args.raw, stream=sys.stdout, **_generation_kwargs(args))
    return 0


def _chat(args: argparse.Namespace) -> int:
    """Interactive chat with the chat template; history kept until /reset."""
    from qlora.generate import chat_loop

    model, tok = _load(args)
    chat_loop(model, tok, sys.stdin, **_generation_kwargs(args))
    return 0


def _quantize(args: argparse.Namespace) -> int:
    """Write a pre-quantized checkpoint in the bitsandbytes layout."""
    from qlora.models import load_model, save_quantized

    model, tok = load_model(
        args.source,
        quant=args.quant,
        double_quant=args.double_quant,
        blocksize=args.blocksize,
    )
    out = save_quantized(model, args.output, tok)
    info = model.qlora_load_info
    print(
        f"wrote {out}: {info.quantized_layers} {args.quant} layers, "
        f"{info.bits_per_quantized_param:.3f} bits/param in the quantized layers"
    )
    return 0


def _merge(args: argparse.Namespace) -> int:
    """Base + adapter -> a full-precision Hugging Face directory, with the measured drift."""
    from qlora.adapters import export_merged

    if not args.adapter:
        print("qlora merge: error: give the adapter to merge with --adapter DIR", file=sys.stderr)
        return 2
    model, tok = _load(args)
    ids = tok("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    report = export_merged(model, args.output, tok, check_input_ids=ids)
    print(report)
    return 0


def _train(args: argparse.Namespace) -> int:
    """Fine-tune from a recipe YAML with section.key=value overrides."""
    from qlora.config import load_run_config
    from qlora.recipe import run_training

    config = load_run_config(args.config, args.set)
    result = run_training(config, resume=args.resume)
    train = result.train
    evaluation = f", eval loss {train.eval_loss:.4f}" if train.eval_loss is not None else ""
    print(
        f"trained {train.steps} steps in {train.seconds:.0f} s: final loss "
        f"{train.train_loss:.4f}{evaluation}; adapter in {result.adapter_dir}; metrics and "
        f"loss.png in {train.output_dir}"
    )
    return 0


def _eval(args: argparse.Namespace) -> int:
    """Loss and perplexity on a dataset, with and without the adapter(s)."""
    import math

    from qlora.config import DataConfig
    from qlora.data import BatchLoader, load_data, pad_id_of
    from qlora.nn import disable_adapters
    from qlora.train import evaluate

    model, tok = _load(args)
    data = load_data(
        DataConfig(path=args.data, format=args.format, eval_fraction=0.0,
                   max_seq_len=args.max_seq_len),
        tok,
    )  # fmt: skip
    batches = list(BatchLoader(data.train, args.batch_size, pad_id_of(tok), shuffle=False))
    rows = []
    if args.adapter:
        with disable_adapters(model):
            rows.append(("base", evaluate(model, batches)))
        rows.append(("base + adapter", evaluate(model, batches)))
    else:
        rows.append(("base", evaluate(model, batches)))
    for name, loss in rows:
        print(f"{name:<15} loss {loss:.4f}  perplexity {math.exp(loss):.3f}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    """The main job: QLoRA-teach the default model a task, with before/after accuracy."""
    from qlora.demo import run_demo

    run_demo(args.output_dir, steps=args.steps)
    return 0


def _add_generation_args(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--max-new-tokens", type=int, default=256)
    sub.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    sub.add_argument("--top-p", type=float, default=0.9)


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

    gen = commands.add_parser("generate", help="prompt -> text, streamed (optional adapters)")
    gen.add_argument("prompt")
    _add_model_args(gen)
    _add_generation_args(gen)
    gen.add_argument("--raw", action="store_true", help="no chat template")
    gen.set_defaults(handler=_generate)

    chat = commands.add_parser("chat", help="interactive chat with the chat template")
    _add_model_args(chat)
    _add_generation_args(chat)
    chat.set_defaults(handler=_chat)

    quant = commands.add_parser(
        "quantize", help="write a pre-quantized checkpoint (bitsandbytes layout)"
    )
    quant.add_argument("source", help="registered name, HF directory or .gguf file")
    quant.add_argument("output", help="the directory to write")
    quant.add_argument("--quant", default="nf4", choices=("nf4", "fp4", "int8", "nf2"))
    quant.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=True)
    quant.add_argument("--blocksize", type=int, default=64)
    quant.set_defaults(handler=_quantize)

    merge = commands.add_parser(
        "merge",
        help="base + adapter -> full-precision HF checkpoint (folds into the dequantized base)",
        description="Load the base as the adapter was trained (--quant, default nf4), apply "
        "the adapter, fold B·A into the weights the adapter saw and write a checkpoint that "
        "plain transformers loads; prints the measured logit drift.",
    )
    merge.add_argument("output", help="the directory to write")
    _add_model_args(merge)
    merge.set_defaults(handler=_merge)

    train = commands.add_parser("train", help="fine-tune from a recipe YAML (configs/)")
    train.add_argument("config", nargs="?", help="recipe YAML (default: all defaults)")
    train.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value, e.g. --set train.lr=1e-4 (repeatable)",
    )
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    train.set_defaults(handler=_train)

    ev = commands.add_parser(
        "eval", help="loss / perplexity on a dataset, with and without adapters"
    )
    _add_model_args(ev)
    ev.add_argument("--data", required=True, help="JSON/JSONL records")
    ev.add_argument("--format", default="auto", choices=("auto", "alpaca", "chat", "text"))
    ev.add_argument("--max-seq-len", type=int, default=512)
    ev.add_argument("--batch-size", type=int, default=8)
    ev.set_defaults(handler=_eval)

    demo = commands.add_parser(
        "demo", help="QLoRA-fine-tune the default model on a generated task: before/after"
    )
    demo.add_argument("--output-dir", default="out/demo")
    demo.add_argument("--steps", type=int, default=40)
    demo.set_defaults(handler=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    from qlora.config import ConfigError
    from qlora.models import ModelLoadError

    try:
        return int(args.handler(args))
    except (ConfigError, ModelLoadError, OSError, ValueError, RuntimeError) as err:
        # Bad input: one line naming the culprit, not a traceback.
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"qlora {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
