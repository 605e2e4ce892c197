"""Typed configuration: the dataclasses are the single source of truth for YAML and CLI flags.

Every field has a default that follows the QLoRA recipe where one applies. `from_dict`
rejects unknown keys and values outside a `Literal`'s choices with a message that lists the
valid ones, so a typo in a YAML file fails loudly instead of being silently ignored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, Union

__all__ = [
    "ConfigError",
    "DataConfig",
    "LoraConfig",
    "ModelConfig",
    "QuantConfig",
    "RunConfig",
    "TrainConfig",
    "from_dict",
    "load_run_config",
]

T = TypeVar("T")

TargetModules = str | list[str]


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names it and the valid choices."""


@dataclass
class QuantConfig:
    """How the frozen base weights are stored.

    Attributes:
        kind: codebook for the frozen Linear weights; None keeps them in full precision.
        blocksize: elements per absmax block (power of two, 32..4096).
        double_quant: also quantize the absmax values (saves ~0.37 bits/param at blocksize 64).
        compute_dtype: dtype the weights are dequantized to for the matmul. float32 on CPUs
            without bf16 hardware (bf16 matmuls are far slower there); bfloat16 on GPUs.
        target_modules: which Linear layers to quantize: "all-linear" (all but the output
            head), a list of module-name suffixes, or a regular expression on the full name.
    """

    kind: Literal["nf4", "fp4", "int8", "nf2"] | None = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    target_modules: TargetModules = "all-linear"

    def __post_init__(self) -> None:
        from qlora.quant.blockwise import BLOCKSIZES

        if self.blocksize not in BLOCKSIZES:
            raise ConfigError(
                f"quant.blocksize={self.blocksize} is not supported; choose one of "
                f"{', '.join(map(str, BLOCKSIZES))}"
            )


@dataclass
class LoraConfig:
    """Low-rank adapters: y = W x + scaling · B(A(dropout(x))).

    Attributes:
        r: rank of the update (A is [r, in], B is [out, r]).
        alpha: scaling numerator: scaling = alpha / r, or alpha / sqrt(r) with use_rslora.
        dropout: dropout probability on the adapter input.
        target_modules: "all-linear" (every Linear but the output head), a list of
            module-name suffixes (e.g. ["q_proj", "v_proj"]), or a regex matched against the
            full module name.
        exclude_modules: module-name suffixes never to adapt.
        use_rslora: rank-stabilized scaling alpha / sqrt(r) (Kalajdzievski 2023).
        init: "kaiming" (A kaiming-uniform, B zeros: PEFT's default), "gaussian"
            (A ~ N(0, 1/r), B zeros) or "loftq": quantize the base and fit A, B to its
            quantization error so that Q + scaling·BA ≈ W at step 0 (needs the
            full-precision weights and a quant.kind; see qlora.nn.loftq).
        loftq_iters: alternating quantize / truncated-SVD rounds of init="loftq". 1 keeps
            the base byte-identical to plain quantization (the adapter then works on any
            normally loaded base); more rounds change the base itself.
        bias: trainable biases; only "none" is supported (as in QLoRA).
    """

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: TargetModules = "all-linear"
    exclude_modules: list[str] = field(default_factory=list)
    use_rslora: bool = False
    init: Literal["kaiming", "gaussian", "loftq"] = "kaiming"
    loftq_iters: int = 1
    bias: Literal["none"] = "none"

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ConfigError(f"lora.r must be a positive integer, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if self.loftq_iters < 1:
            raise ConfigError(f"lora.loftq_iters must be >= 1, got {self.loftq_iters}")

    @property
    def scaling(self) -> float:
        return self.alpha / (self.r**0.5 if self.use_rslora else self.r)


@dataclass
class DataConfig:
    """Training data: where it is, how records become token ids and labels.

    Attributes:
        path: a JSON (a list of records) or JSONL file.
        format: "alpaca" (instruction, input, output), "chat" (messages with role/content),
            "text" (plain text, continued pre-training), or "auto" (decided per file from the
            first record's keys).
        eval_path: a held-out file in the same format; when None, ``eval_fraction`` of the
            records (a seeded shuffle) is held out instead.
        eval_fraction: share of records held out for evaluation when ``eval_path`` is None.
        max_seq_len: longer examples are truncated (the count is reported).
        train_on_prompt: also compute the loss on prompt tokens (default: response only,
            prompt labels are -100).
        packing: pack several examples into one sequence (attention does not cross example
            boundaries where the architecture allows; see qlora.data).
        group_by_length: batch examples of similar length together (less padding).
        on_bad_record: "error" (stop with the file and line number) or "skip" (skip and count).
        seed: the shuffle / split seed.
    """

    path: str = ""
    format: Literal["auto", "alpaca", "chat", "text"] = "auto"
    eval_path: str | None = None
    eval_fraction: float = 0.05
    max_seq_len: int = 512
    train_on_prompt: bool = False
    packing: bool = False
    group_by_length: bool = True
    on_bad_record: Literal["error", "skip"] = "error"
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"data.eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.max_seq_len <= 0:
            raise ConfigError(f"data.max_seq_len must be positive, got {self.max_seq_len}")


@dataclass
class TrainConfig:
    """The optimization loop. Defaults follow the QLoRA recipe where one applies.

    Attributes:
        output_dir: where checkpoints, the adapter, metrics.jsonl and the loss plot go.
        batch_size: examples per micro-batch.
        grad_accum: micro-batches per optimizer step.
        max_steps: optimizer steps (takes precedence over epochs when > 0).
        epochs: passes over the training data when ``max_steps`` is 0.
        lr: peak learning rate (QLoRA: 2e-4 for 7B-13B models).
        schedule: "constant" (QLoRA's choice), "cosine" or "linear", after warmup.
        warmup_steps: linear warmup from 0.
        weight_decay: AdamW weight decay.
        max_grad_norm: gradient clipping (QLoRA: 0.3); 0 disables it.
        optim: "adamw" (torch.optim.AdamW), "adamw8bit" (8-bit moments: 2 bytes of state per
            trainable parameter instead of 8), "paged_adamw" / "paged_adamw8bit" (the state
            kept off the compute device and paged in ``optim_page_mb`` at a time: pinned host
            memory on a GPU, a memory-mapped file in ``optim_dir`` on a CPU). See qlora.optim.
        optim_page_mb: page size of the paged optimizers, in MiB of state.
        optim_dir: directory of the paged optimizers' state file on a CPU (default:
            ``<output_dir>/optimizer-state``; use a disk, not a RAM-backed tmpfs).
        grad_ckpt: recompute activations in backward (less memory, ~30% more compute).
        loss_chunk: tokens per chunk of the output-head + cross-entropy computation, so the
            full [tokens x vocab] fp32 logits are never materialized.
        malloc_mmap_kb: on the CPU, make glibc map every allocation of this many KiB or more
            and unmap it when freed, so freed activations leave the process (glibc otherwise
            keeps them: resident memory 1.4-2.7x the live tensors). Costs page faults (a
            checkpointed step of the default model: ~15% slower here). Process-wide; 0
            leaves the allocator alone. See qlora.train.allocator.
        eval_every: evaluate every N optimizer steps (0: only at the end).
        save_every: checkpoint every N optimizer steps (0: only at the end).
        log_every: print a line every N steps (metrics.jsonl gets every step).
        seed: seeds Python, torch and the data order.
        tensorboard: also log to TensorBoard (needs the tensorboard package).
    """

    output_dir: str = "out"
    batch_size: int = 4
    grad_accum: int = 1
    max_steps: int = 0
    epochs: float = 1.0
    lr: float = 2e-4
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 0.3
    optim: Literal["adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit"] = "adamw"
    optim_page_mb: int = 64
    optim_dir: str = ""
    grad_ckpt: bool = False
    loss_chunk: int = 1024
    malloc_mmap_kb: int = 128
    eval_every: int = 0
    save_every: int = 0
    log_every: int = 10
    seed: int = 0
    tensorboard: bool = False

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum", "loss_chunk", "optim_page_mb"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"train.{name} must be positive, got {getattr(self, name)}")
        for name in ("max_steps", "warmup_steps", "eval_every", "save_every", "malloc_mmap_kb"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class ModelConfig:
    """Which base model, and where it runs.

    Attributes:
        source: a registered name (default smollm2-135m), a Hugging Face directory, a .gguf
            file or a directory saved pre-quantized by bitsandbytes (see qlora.load_model).
        dtype: dtype of the parts kept in full precision ("auto": float32 on CPU, bfloat16
            on CUDA).
        device: "auto" (CUDA when available), "cpu" or "cuda[:N]".
    """

    source: str = "smollm2-135m"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"


@dataclass
class RunConfig:
    """A whole fine-tuning run: the sections of a recipe YAML file."""

    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


_SECTIONS = {
    "model": ModelConfig,
    "quant": QuantConfig,
    "lora": LoraConfig,
    "data": DataConfig,
    "train": TrainConfig,
}


def _parse_override(item: str) -> tuple[str, str, Any]:
    """``section.key=value`` -> (section, key, YAML-parsed value)."""
    import yaml

    if "=" not in item or "." not in item.split("=", 1)[0]:
        raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. train.lr=1e-4")
    dotted, raw = item.split("=", 1)
    section, key = dotted.split(".", 1)
    return section, key, yaml.safe_load(raw) if raw != "" else ""


def load_run_config(path: str | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a recipe YAML (sections model, quant, lora, data, train) and apply overrides.

    Args:
        path: the YAML file (None: all defaults).
        overrides: ``section.key=value`` strings; values are parsed as YAML (1e-4, true, [a, b]).

    Raises:
        ConfigError: a missing or unreadable file, an unknown section or key, a bad value;
            the message names it and lists the valid ones.
    """
    import yaml

    values: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path) as f:
                values = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected sections {', '.join(_SECTIONS)} at the top")
    for item in overrides or []:
        section, key, value = _parse_override(item)
        values.setdefault(section, {})
        if not isinstance(values[section], dict):
            raise ConfigError(f"config section {section!r} must be a mapping")
        values[section][key] = value
    sections = {}
    for name, body in values.items():
        if name not in _SECTIONS:
            raise ConfigError(
                f"unknown config section {name!r}; valid sections: {', '.join(_SECTIONS)}"
            )
        if not isinstance(body, dict):
            raise ConfigError(f"config section {name!r} must be a mapping, got {body!r}")
        sections[name] = from_dict(_SECTIONS[name], body, section=name)
    return RunConfig(**sections)


def _check_value(name: str, value: Any, annotation: Any) -> None:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            raise ConfigError(
                f"{name}={value!r} is not valid; choose one of {', '.join(map(repr, choices))}"
            )
        return
    if origin in (Union, types.UnionType):
        options = typing.get_args(annotation)
        errors = []
        for option in options:
            try:
                _check_value(name, value, option)
                return
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{name}={value!r} is not valid")
    if annotation is type(None):
        if value is not None:
            raise ConfigError(f"{name} must be None, got {value!r}")
        return
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        return
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        (item,) = typing.get_args(annotation) or (Any,)
        for i, element in enumerate(value):
            _check_value(f"{name}[{i}]", element, item)


def from_dict(cls: type[T], values: dict[str, Any], section: str = "") -> T:
    """Build config dataclass ``cls`` from a mapping, rejecting unknown keys and bad values."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    prefix = f"{section}." if section else ""
    values = dict(values)
    for key, value in values.items():
        if key not in names:
            raise ConfigError(
                f"unknown config key {prefix + key!r}; valid keys: {', '.join(names)}"
            )
        if hints[key] is float and isinstance(value, str):
            # YAML 1.1 reads 1e-4 (no dot) as a string; accept it as the number it means.
            with contextlib.suppress(ValueError):
                values[key] = value = float(value)
        _check_value(prefix + key, value, hints[key])
    kwargs = {k: (list(v) if isinstance(v, tuple) else v) for k, v in values.items()}
    for key, hint in hints.items():  # YAML writes 2 for 2.0: keep float fields floats
        if hint is float and isinstance(kwargs.get(key), int):
            kwargs[key] = float(kwargs[key])
    return cls(**kwargs)
