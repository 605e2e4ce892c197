"""`qlora` command line. Subcommands are thin layers over the library's public API.

Flags that set a config value are declared from the config dataclasses (`_field_option`):
their type, default, choices and help are read off the field (its annotation, default and
``Attributes:`` docstring line), and a value is checked by the dataclass itself while the
arguments are parsed, so ``--top-p 5`` is an argparse error before any model loads. The
``estimate`` flags are read off `qlora.memory.estimate` the same way (`_param_option`).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import inspect
import os
import platform
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "main"]

# The CLI spelling of a null choice (``QuantConfig.kind=None``: full precision).
_NONE = "none"
_INTERRUPTED = 130  # the shell's status for a process ended by SIGINT (128 + 2)


# -- flags read off the config dataclasses ---------------------------------------------------


def _help(doc: str, default: Any) -> str:
    text = doc.replace("%", "%%")  # argparse expands %(...)s in help
    return text if default is None else f"{text} (default: %(default)s)"


def _scalar(annotation: Any) -> type:
    """int, float or str: the type a flag's text converts to."""
    for option in (annotation, *typing.get_args(annotation)):
        if option in (int, float):
            return option
    return str


def _checked(cls: type, name: str) -> Callable[[str], Any]:
    """An argparse ``type=`` that converts the text and lets ``cls`` check the value."""
    from qlora.config import ConfigError

    kind = _scalar(typing.get_type_hints(cls)[name])
    words = {int: "an integer", float: "a number", str: "a string"}

    def convert(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {words[kind]}, got {text!r}") from None
        try:
            cls(**{name: value})
        except ConfigError as err:  # "generation.top_p must be ..." -> "top_p must be ..."
            message = str(err).removeprefix(f"{cls.SECTION}.")  # type: ignore[attr-defined]
            raise argparse.ArgumentTypeError(message) from None
        return value

    return convert


def _field_option(
    parser: argparse.ArgumentParser,
    flag: str,
    cls: type,
    name: str,
    *,
    allow_none: bool = True,
    **overrides: Any,
) -> None:
    """``flag`` for config field ``cls.name``: its default, choices, help and checks."""
    from qlora.config import field_choices, field_doc

    fields = {f.name: f for f in dataclasses.fields(cls)}
    default = overrides.pop("default", fields[name].default)
    shown = None if overrides.get("required") else default
    kwargs: dict[str, Any] = {"default": default, "help": _help(field_doc(cls, name), shown)}
    choices = [c for c in field_choices(cls, name) if allow_none or c is not None]
    if isinstance(default, bool):
        kwargs["action"] = argparse.BooleanOptionalAction
    elif choices:
        kwargs["choices"] = [_NONE if c is None else c for c in choices]
        kwargs["default"] = _NONE if default is None else default
    else:
        kwargs["type"] = _checked(cls, name)
    parser.add_argument(flag, **(kwargs | overrides))


def _param_option(
    parser: argparse.ArgumentParser,
    flag: str,
    function: Callable[..., Any],
    name: str,
    **overrides: Any,
) -> None:
    """``flag`` for keyword ``name`` of ``function``: default, choices and help (its
    docstring's ``Args:`` entry) read off the function."""
    from qlora.config import doc_entry, literal_choices

    annotation = typing.get_type_hints(function)[name]
    choices = [c for c in literal_choices(annotation) if c is not None]
    default = overrides.pop("default", inspect.signature(function).parameters[name].default)
    kwargs: dict[str, Any] = {"default": default}
    kwargs["help"] = _help(doc_entry(function.__doc__ or "", "Args", name), default)
    if isinstance(default, bool):
        kwargs["action"] = argparse.BooleanOptionalAction
    elif choices:
        kwargs["choices"] = choices
    else:
        kwargs["type"] = _scalar(annotation)
    parser.add_argument(flag, **(kwargs | overrides))


def _none(value: str | None) -> str | None:
    return None if value == _NONE else value


# -- commands --------------------------------------------------------------------------------


def _env(_: argparse.Namespace) -> int:
    """Print what this installation can use: versions, fast kernels, devices."""
    import torch

    import qlora
    from qlora.hardware import choose_compute_dtype
    from qlora.kernels import describe

    cpu = choose_compute_dtype("cpu")
    rows = {
        "qlora": qlora.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu threads": str(torch.get_num_threads()),
        **describe(),
        "compute_dtype auto (cpu)": f"{cpu.name}: {cpu.reason}",
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
    }
    if torch.cuda.is_available():
        gpu = choose_compute_dtype("cuda")
        rows["compute_dtype auto (cuda)"] = f"{gpu.name}: {gpu.reason}"
    for name in ("transformers", "bitsandbytes", "peft", "triton"):
        try:  # the installed version, without importing it (bitsandbytes warns on import)
            rows[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            rows[name] = "not installed"
    width = max(map(len, rows))
    for key, value in rows.items():
        print(f"{key:<{width}}  {value}")
    return 0


def _estimate(args: argparse.Namespace) -> int:
    """Print the memory estimate for one model, a table across sizes, or the comparison."""
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
        parallel = {
            "world_size": args.world_size,
            "parallel": args.parallel,
            "cpu_offload": args.cpu_offload,
        }
        print(estimate(args.model, args.method, **settings, **parallel))
    return 0


def _load(args: argparse.Namespace, tokenizer: bool = True) -> tuple:
    from qlora.models import load_model

    model, tok = load_model(args.model, quant=_none(args.quant), tokenizer=tokenizer)
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
    from qlora import generate

    if not args.prompt.strip():  # before the model loads: nothing to generate from
        raise ValueError("the prompt is empty: give the text to continue")
    model, tok = _load(args)
    messages = [{"role": "user", "content": args.prompt}]
    generate.generate_text(
        model, tok, messages, raw=args.raw, stream=sys.stdout, **_generation_kwargs(args)
    )
    return 0


def _chat(args: argparse.Namespace) -> int:
    """Interactive chat with the chat template; history kept until /reset."""
    from qlora import generate

    model, tok = _load(args)
    generate.chat_loop(model, tok, sys.stdin, **_generation_kwargs(args))
    return 0


def _serve(args: argparse.Namespace) -> int:
    """The OpenAI-compatible server over one base model and named adapters."""
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:  # before the model loads
        raise RuntimeError(f'qlora serve needs {", ".join(missing)}: pip install "qlora[serve]"')
    for name, path in args.adapter:  # before the model loads: a typo costs no load time
        if not Path(path).is_dir():
            raise ValueError(f"--adapter {name}={path}: no such adapter directory")
    import torch

    from qlora.models import load_model
    from qlora.models.batch_decode import batch_decode_unsupported
    from qlora.serve import BatchingEngine, SequentialEngine
    from qlora.serve.app import run_server

    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, quant=_none(args.quant))
    unsupported = batch_decode_unsupported(model)
    if unsupported is None:
        engine: Any = BatchingEngine(model, tok, args.model, dict(args.adapter), args.max_batch)
    else:
        print(f"qlora serve: one request at a time (no batching for {unsupported})", flush=True)
        engine = SequentialEngine(model, tok, args.model, dict(args.adapter))
    names = ", ".join(m.name for m in engine.models())
    print(f"qlora serve: {names} at http://{args.host}:{args.port}/v1", flush=True)
    run_server(engine, host=args.host, port=args.port, api_key=args.api_key)
    return 0


def _named_adapter(text: str) -> tuple[str, str]:
    """``NAME=PATH`` -> (name, path), for ``qlora serve --adapter``."""
    name, sep, path = text.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=PATH (an adapter directory), got {text!r}")
    return name.strip(), path.strip()


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is an integer in 0..65535, got {text!r}")
    return port


def _add_serve(commands: Any) -> None:
    from qlora.config import ModelConfig, QuantConfig
    from qlora.serve.batching import DEFAULT_MAX_BATCH

    serve = commands.add_parser(
        "serve",
        help="an OpenAI-compatible server (/v1/chat/completions ...) with adapters by name",
        description="Serves one base model and named LoRA adapters over OpenAI's HTTP API; "
        "a request's model is the base's name (--model as given) or an adapter's name.",
    )
    _field_option(serve, "--model", ModelConfig, "source")
    _field_option(serve, "--quant", QuantConfig, "kind")
    serve.add_argument(
        "--adapter",
        action="append",
        default=[],
        type=_named_adapter,
        metavar="NAME=PATH",
        help="a LoRA adapter directory served as model NAME (repeat for more)",
    )
    serve.add_argument(
        "--max-batch",
        type=_positive_int,
        default=DEFAULT_MAX_BATCH,
        help="most requests decoded together, any mix of adapters (default: %(default)s)",
    )
    serve.add_argument(
        "--threads",
        type=_positive_int,
        default=max(1, (os.cpu_count() or 1) - 1),
        help="compute threads (default: every core but one, left to the HTTP layer: %(default)s)",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    serve.add_argument("--port", type=_port, default=8000, help="port (default: %(default)s)")
    serve.add_argument(
        "--api-key",
        default=os.environ.get("QLORA_API_KEY") or None,
        help="require 'Authorization: Bearer KEY' on /v1 routes (default: $QLORA_API_KEY)",
    )
    serve.set_defaults(handler=_serve)


def _quantize(args: argparse.Namespace) -> int:
    """Write a pre-quantized checkpoint in the bitsandbytes layout."""
    from qlora import models
    from qlora.models.destination import check_output_directory

    check_output_directory(args.output, args.overwrite, [args.source])  # before loading
    model, tok = models.load_model(
        args.source,
        quant=args.quant,
        double_quant=args.double_quant,
        blocksize=args.blocksize,
    )
    out = models.save_quantized(model, args.output, tok, overwrite=args.overwrite)
    info = model.qlora_load_info
    print(
        f"wrote {out}: {info.quantized_layers} {args.quant} layers, "
        f"{info.bits_per_quantized_param:.3f} bits/param in the quantized layers"
    )
    return 0


def _merge(args: argparse.Namespace) -> int:
    """Base + adapter -> a full-precision Hugging Face directory, with the measured drift."""
    from qlora import adapters
    from qlora.models.destination import check_output_directory

    if not args.adapter:
        raise ValueError("give the adapter to merge with --adapter DIR")
    check_output_directory(args.output, args.overwrite, [args.model])  # before loading
    model, tok = _load(args)
    ids = tok("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    report = adapters.export_merged(
        model, args.output, tok, check_input_ids=ids, overwrite=args.overwrite
    )
    print(report)
    return 0


def _train(args: argparse.Namespace) -> int:
    """Fine-tune from a recipe YAML with section.key=value overrides."""
    from qlora import recipe
    from qlora.config import load_run_config

    config = load_run_config(args.config, args.set)
    # run_training checks the data files and claims the output directory before loading
    result = recipe.run_training(config, resume=args.resume, overwrite=args.overwrite)
    train = result.train
    if result.rank != 0:  # under torchrun: rank 0 speaks for the job
        return 0
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


def _default_model() -> str:
    from qlora.config import ModelConfig

    return ModelConfig.source


def _check_modelfile(args: argparse.Namespace) -> None:
    """With --ollama, an existing Modelfile is refused before anything is written."""
    from qlora.export.ollama import MODELFILE_NAME
    from qlora.files import check_file_destination

    if args.ollama:
        modelfile = Path(args.output).absolute().parent / MODELFILE_NAME
        check_file_destination(modelfile, overwrite=args.overwrite)


def _fidelity_fits(model: Any) -> bool:
    """Whether the report's float32 copy of the model (4 bytes/parameter) fits in half of the
    memory available now; if not, say so and skip it (a 7B export must not need 28 GB)."""
    from qlora.nn import QuantLinear

    packed = sum(m.quant_state.numel for m in model.modules() if isinstance(m, QuantLinear))
    need = 4 * (sum(p.numel() for p in model.parameters()) + packed)
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if need <= available // 2:
        return True
    print(
        f"fidelity report skipped: its float32 copy of the model needs {need / 2**30:.1f} GiB, "
        f"{available / 2**30:.1f} GiB are available (--no-fidelity silences this)",
        file=sys.stderr,
    )
    return False


def _export(args: argparse.Namespace) -> int:
    """A merged model (``gguf``) or a LoRA adapter (``gguf-adapter``) as a llama.cpp GGUF, or
    an adapter re-saved at another precision (``peft``)."""
    if args.format == "peft":
        return _export_peft(args)
    if args.adapter_dtype is not None:
        raise ValueError(
            f"--adapter-dtype applies to --format peft only, not --format {args.format} (the "
            "GGUF writers choose their own tensor types; gguf: --type): drop --adapter-dtype"
        )
    _check_modelfile(args)
    if args.format == "gguf-adapter":
        return _export_adapter(args)
    from qlora.export.fidelity import fidelity_path, read_fidelity_report
    from qlora.export.gguf_model import check_gguf_destination, export_gguf

    check_gguf_destination(args.output, args.overwrite)  # before loading
    if args.fidelity:
        check_gguf_destination(fidelity_path(args.output), args.overwrite)
    _check_architecture(args.model)
    # The base the adapter was trained against (QLoRA: nf4); without one, nothing to match.
    args.quant = getattr(args, "quant", "nf4" if args.adapter else _NONE)
    args.model = args.model or _default_model()
    model, tok = _load(args)
    fidelity = args.fidelity and _fidelity_fits(model)
    path = export_gguf(
        model, args.output, tok, type=args.type, overwrite=args.overwrite, fidelity=fidelity
    )
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {args.type})")
    if fidelity:
        print(f"{read_fidelity_report(path)} (wrote {fidelity_path(path)})")
    if args.ollama:
        from qlora.export.ollama import write_modelfile

        print(f"wrote {write_modelfile(path, tokenizer=tok, overwrite=args.overwrite)}")
    return 0


def _check_architecture(source: str | None) -> None:
    """An HF directory's unsupported architecture is an error before the model loads."""
    import json

    from qlora.models.gguf_names import gguf_arch

    config = Path(source or "") / "config.json"
    if source and config.is_file():
        fields = json.loads(config.read_text())
        gguf_arch(argparse.Namespace(**{k: fields.get(k) for k in ("architectures", "model_type")}))


def _export_peft(args: argparse.Namespace) -> int:
    """One adapter directory re-saved at --adapter-dtype (no model is loaded)."""
    from qlora.adapters import convert_adapter

    if len(args.adapter) != 1:
        raise ValueError("--format peft re-saves one adapter: give --adapter DIR once")
    if args.ollama:
        raise ValueError("--ollama needs a GGUF: use --format gguf or gguf-adapter")
    dtype = args.adapter_dtype or "float32"
    out = convert_adapter(args.adapter[0], args.output, dtype, overwrite=args.overwrite)
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    print(f"wrote {out} ({size / 2**20:.2f} MiB, {dtype})")
    return 0


def _adapter_base(args: argparse.Namespace) -> str:
    """The base an adapter belongs to: --model, else its own base_model_name_or_path when
    that is a model here (a directory, a .gguf, a registered name), else the default model."""
    import json

    from qlora.models.registry import registered_path

    if args.model:
        return args.model
    config = Path(args.adapter[0]) / "adapter_config.json"
    try:
        base = json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        base = None
    if base and (Path(base).exists() or registered_path(str(base)) is not None):
        return str(base)
    return _default_model()


def _export_adapter(args: argparse.Namespace) -> int:
    """The adapter as a llama.cpp LoRA GGUF; then its fidelity: the file applied to the base
    GGUF (when the base is one) against our base + adapter."""
    from qlora.export.fidelity import adapter_fidelity_report, fidelity_path, write_fidelity_report
    from qlora.export.gguf_adapter import export_adapter_gguf
    from qlora.export.gguf_model import check_gguf_destination
    from qlora.models.registry import registered_path

    if len(args.adapter) != 1:
        raise ValueError("--format gguf-adapter exports one adapter: give --adapter DIR once")
    name = _adapter_base(args)
    base = registered_path(name) or Path(name)
    base_gguf = base if base.suffix == ".gguf" and base.is_file() else None
    if args.ollama and base_gguf is None:
        raise ValueError(
            f"--ollama needs the base as a GGUF file for FROM; {name!r} is not one: pass "
            "--model BASE.gguf (or export the base with --format gguf)"
        )
    if args.fidelity:  # refused before any work, as for the merged report
        check_gguf_destination(fidelity_path(args.output), args.overwrite)
    path = export_adapter_gguf(
        args.adapter[0], args.output, model=args.model, overwrite=args.overwrite
    )
    print(f"wrote {path} ({path.stat().st_size / 2**20:.2f} MiB)")
    if args.fidelity:
        args.model = name
        args.quant = getattr(args, "quant", "nf4")  # the base the adapter was trained against
        model, tok = _load(args)
        if _fidelity_fits(model):
            report = adapter_fidelity_report(model, tok, path, base_gguf)
            print(f"{report} (wrote {write_fidelity_report(report)})")
            if base_gguf is not None and args.quant != "gguf":
                print(
                    f"  ours: the adapter on a {args.quant} base; an adapter trained with "
                    "quant.kind gguf runs on exactly the GGUF's weights (--quant gguf)"
                )
    if args.ollama:
        from qlora.export.ollama import write_modelfile

        assert base_gguf is not None  # checked above
        print(f"wrote {write_modelfile(base_gguf, adapter_gguf=path, overwrite=args.overwrite)}")
    return 0


# -- the parser ------------------------------------------------------------------------------


def _add_model_args(sub: argparse.ArgumentParser) -> None:
    from qlora.config import ModelConfig, QuantConfig

    _field_option(sub, "--model", ModelConfig, "source")
    _field_option(sub, "--quant", QuantConfig, "kind")
    sub.add_argument("--adapter", action="append", default=[], help="a LoRA adapter directory")


def _add_generation_args(sub: argparse.ArgumentParser) -> None:
    from qlora.config import GenerationConfig

    _field_option(sub, "--max-new-tokens", GenerationConfig, "max_new_tokens")
    _field_option(sub, "--temperature", GenerationConfig, "temperature")
    _field_option(sub, "--top-p", GenerationConfig, "top_p")


_OVERWRITE_HELP = (
    "when OUTPUT exists, replace the files this command writes there; other files are "
    "never touched (default: refuse an existing, non-empty OUTPUT)"
)


def _add_estimate(commands: Any) -> None:
    from qlora.config import LoraConfig
    from qlora.memory import estimate

    est = commands.add_parser(
        "estimate",
        help="estimate the memory of fine-tuning (weights, adapters, optimizer, activations)",
        description="Peak memory of one fine-tuning step; without --model, a table across sizes.",
    )
    est.add_argument("--model", help="size (7b, 13b, 70b, 8x7b, 135m, ...) or a config.json")
    _param_option(est, "--method", estimate, "method")
    _param_option(est, "--batch", estimate, "batch")
    _param_option(est, "--seq-len", estimate, "seq_len")
    _param_option(est, "--rank", estimate, "rank", default=LoraConfig.r)
    _param_option(est, "--optim", estimate, "optimizer")
    _param_option(est, "--grad-ckpt", estimate, "grad_ckpt")
    _param_option(est, "--chunked-loss", estimate, "chunked_loss")
    _param_option(est, "--compute-dtype", estimate, "compute_dtype")
    _param_option(est, "--device", estimate, "device")
    _param_option(est, "--world-size", estimate, "world_size")
    _param_option(est, "--parallel", estimate, "parallel")
    _param_option(est, "--cpu-offload", estimate, "cpu_offload")
    est.add_argument("--sizes", action="store_true", help="table across sizes x methods")
    est.add_argument(
        "--compare-table",
        action="store_true",
        help="ours beside the published rule-of-thumb table (docs/memory.md)",
    )
    est.set_defaults(handler=_estimate)


def _add_inference(commands: Any) -> None:
    from qlora.config import QuantConfig

    gen = commands.add_parser("generate", help="prompt -> text, streamed (optional adapters)")
    gen.add_argument("prompt")
    _add_model_args(gen)
    _add_generation_args(gen)
    gen.add_argument("--raw", action="store_true", help="no template: the text as it is")
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
    # a codebook only: "gguf" keeps a .gguf file's blocks, it writes no bitsandbytes layout
    from qlora.quant import KINDS as codebooks

    _field_option(quant, "--quant", QuantConfig, "kind", allow_none=False, choices=codebooks)
    _field_option(quant, "--double-quant", QuantConfig, "double_quant")
    _field_option(quant, "--blocksize", QuantConfig, "blocksize")
    quant.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
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
    merge.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
    merge.set_defaults(handler=_merge)


def _add_export(commands: Any) -> None:
    from qlora.config import QuantConfig, TrainConfig, field_choices
    from qlora.export.gguf_model import GGUF_TYPES

    ex = commands.add_parser(
        "export",
        help="write a GGUF for llama.cpp / Ollama (the merged model or the LoRA adapter), or "
        "re-save an adapter at another precision",
        description="--format gguf: load the base as the adapter was trained (--quant), fold "
        "each --adapter into the weights it saw and write one .gguf with the tokenizer and "
        "chat template. --format gguf-adapter: the adapter alone, for llama.cpp's --lora. "
        "--format peft: the --adapter directory re-saved at --adapter-dtype (no model loads).",
    )
    ex.add_argument("output", help="the .gguf file to write (peft: the directory)")
    ex.add_argument(
        "--format",
        choices=["gguf", "gguf-adapter", "peft"],
        default="gguf",
        help=(
            "gguf: the merged model; gguf-adapter: the LoRA adapter; peft: the adapter's "
            "PEFT files at --adapter-dtype (default: %(default)s)"
        ),
    )
    ex.add_argument(
        "--adapter-dtype",
        choices=field_choices(TrainConfig, "adapter_dtype"),
        default=None,  # None: not given, so gguf formats can refuse it when it is
        help=(
            "peft only: precision of the written adapter: float32, bfloat16 or float16 "
            "(plain PEFT files) or int8 (blockwise; only qlora loads it) (default: float32)"
        ),
    )
    ex.add_argument(
        "--model",
        default=None,
        help=(
            "the base: a registered name, HF directory or .gguf file (default: "
            f"{_default_model()}; "
            "gguf-adapter: the adapter's base_model_name_or_path)"
        ),
    )
    ex.add_argument("--adapter", action="append", default=[], help="a LoRA adapter directory")
    ex.add_argument(
        "--type",
        choices=list(GGUF_TYPES),
        default="f16",
        help=("type of the 2-D weights; norms stay f32 (default: %(default)s)"),
    )
    _field_option(
        ex,
        "--quant",
        QuantConfig,
        "kind",
        default=argparse.SUPPRESS,
        help=(
            "quantization of the base the adapter was trained against (default: nf4 with "
            "--adapter, none without; gguf: the .gguf's own blocks)"
        ),
    )
    ex.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing OUTPUT file (peft: write into a non-empty directory, "
        "replacing only the adapter's two files)",
    )
    ex.add_argument(
        "--no-fidelity",
        dest="fidelity",
        action="store_false",
        help=(
            "gguf, gguf-adapter: skip the fidelity report (the file read back vs our forward "
            "on held-out text, written as OUTPUT.fidelity.json; needs a float32 copy of the "
            "model)"
        ),
    )
    ex.add_argument(
        "--ollama", action="store_true", help="also write an Ollama Modelfile beside it"
    )
    ex.set_defaults(handler=_export)


def _add_training(commands: Any) -> None:
    from qlora.config import DataConfig, TrainConfig

    train = commands.add_parser("train", help="fine-tune from a recipe YAML (configs/)")
    train.add_argument("config", nargs="?", help="recipe YAML (default: all defaults)")
    train.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value, e.g. --set train.lr=1e-4 (repeatable)",
    )
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in train.output_dir from its newest readable checkpoint",
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in a train.output_dir that holds an earlier run (replaces that "
        "run's files; a folder with files that are not a qlora run's is always refused)",
    )
    train.set_defaults(handler=_train)

    ev = commands.add_parser(
        "eval", help="loss / perplexity on a dataset, with and without adapters"
    )
    _add_model_args(ev)
    _field_option(ev, "--data", DataConfig, "path", required=True)
    _field_option(ev, "--format", DataConfig, "format")
    _field_option(ev, "--max-seq-len", DataConfig, "max_seq_len")
    _field_option(ev, "--batch-size", TrainConfig, "batch_size", default=8)
    ev.set_defaults(handler=_eval)

    demo = commands.add_parser(
        "demo", help="QLoRA-fine-tune the default model on a generated task: before/after"
    )
    demo.add_argument("--output-dir", default="out/demo")
    demo.add_argument("--steps", type=int, default=40)
    demo.set_defaults(handler=_demo)


def build_parser() -> argparse.ArgumentParser:
    import qlora

    parser = argparse.ArgumentParser(
        prog="qlora", description="Fine-tune LLMs with LoRA and QLoRA on the hardware you have."
    )
    parser.add_argument("--version", action="version", version=f"qlora {qlora.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    env = commands.add_parser("env", help="show versions, fast kernels and devices")
    env.set_defaults(handler=_env)
    _add_estimate(commands)
    _add_inference(commands)
    _add_serve(commands)
    _add_training(commands)
    _add_export(commands)
    return parser


# -- running a command -----------------------------------------------------------------------


def _caused_by_interrupt(err: BaseException) -> bool:
    """Whether ``err`` was raised while handling Ctrl-C (the trainer's "how to resume")."""
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, KeyboardInterrupt):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


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
    except KeyboardInterrupt:
        if args.command in ("chat", "generate"):
            print(flush=True)  # end the line the reply was streaming on; nothing else
        else:
            print(f"qlora {args.command}: interrupted", file=sys.stderr)
        return _INTERRUPTED
    except (ConfigError, ModelLoadError, OSError, ValueError, RuntimeError) as err:
        # Bad input: one line naming the culprit, not a traceback. An error raised for
        # Ctrl-C (e.g. the trainer's, saying how to resume) keeps the interrupt's status.
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"qlora {args.command}: error: {message}", file=sys.stderr)
        return _INTERRUPTED if _caused_by_interrupt(err) else 2


if __name__ == "__main__":
    sys.exit(main())
