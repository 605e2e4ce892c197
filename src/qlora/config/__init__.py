"""Typed configuration: the dataclasses are the single source of truth for YAML and CLI flags.

Every field has a default that follows the QLoRA recipe where one applies, a type, and a
line in its class's ``Attributes:`` docstring that the command line shows as its help
(`field_doc`, `field_choices`). Every value is checked when a config is built, from YAML,
``--set`` overrides or Python, so that a bad value fails before any model loads: the type
(a ``Literal``'s choices are listed; they come from the module that owns them: quantization
kinds from `qlora.quant.codebooks`, optimizers from `qlora.optim.build`, dtypes from
`qlora.dtypes`), the range (``train.lr must be > 0, got -1.0``), regular expressions, the
device. Unknown keys are errors too, so a typo in a YAML file fails loudly instead of being
silently ignored.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, TypeVar

from qlora.config.fields import (
    ConfigError,
    check_fields,
    doc_entry,
    field_choices,
    field_doc,
    field_types,
    literal_choices,
    require,
)
from qlora.dtypes import DtypeName
from qlora.optim.build import OptimizerName
from qlora.quant.codebooks import BaseKind

__all__ = [
    "AdapterDtype",
    "ConfigError",
    "DataConfig",
    "GenerationConfig",
    "LoraConfig",
    "ModelConfig",
    "ParallelMode",
    "QuantConfig",
    "RunConfig",
    "TrainConfig",
    "check_data_files",
    "doc_entry",
    "field_choices",
    "field_doc",
    "from_dict",
    "literal_choices",
    "load_run_config",
]

T = TypeVar("T")

# How a saved adapter stores A and B: a float dtype (plain PEFT files) or our blockwise int8
# (qlora.adapters.peft_format documents the layout; only qlora reads it back).
AdapterDtype = Literal[DtypeName, "int8"]
ParallelMode = Literal["auto", "none", "ddp", "fsdp"]  # see qlora.train.parallel

TargetModules = str | list[str]


# -- checks shared by the sections ---------------------------------------------------------


def _check_targets(config: Any, name: str) -> None:
    """A target_modules value: "all-linear", a regex on full names, or a non-empty name list."""
    value = getattr(config, name)
    key = f"{config.SECTION}.{name}"
    if isinstance(value, list):
        require(config, name, bool(value), "a non-empty list of module names")
        require(config, name, all(value), "a list of non-empty module names")
        return
    require(config, name, bool(value), '"all-linear", a list of module names or a regex')
    if value != "all-linear":
        try:
            re.compile(value)
        except re.error as err:
            raise ConfigError(
                f"{key}={value!r} is not a valid regular expression ({err}); give a regex on "
                f'full module names, a list of name suffixes, or "all-linear"'
            ) from None


@dataclass
class QuantConfig:
    """How the frozen base weights are stored.

    Attributes:
        kind: codebook for the frozen Linear weights; null (none) keeps them in full precision;
            "gguf" keeps a .gguf checkpoint's own blocks (Q4_0, Q4_1, Q8_0, K-quants) as they
            are, so the adapter trains on exactly the weights llama.cpp runs (blocksize and
            double_quant do not apply).
        blocksize: elements per absmax block (power of two, 32..4096).
        double_quant: also quantize the absmax values (saves ~0.37 bits/param at blocksize 64).
        compute_dtype: dtype the frozen weights are dequantized to for the matmul ("auto":
            bfloat16 where the hardware multiplies it natively - GPUs, CPUs with AVX512-BF16
            or AMX - and float32 elsewhere, where bf16 matmuls are far slower; `qlora env`
            prints the choice). Activations, adapters, their gradients, the optimizer and
            the loss stay in float32 either way.
        target_modules: which Linear layers to quantize: "all-linear" (all but the output
            head), a list of module-name suffixes, or a regular expression on the full name.
    """

    SECTION: ClassVar[str] = "quant"

    kind: BaseKind | None = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: Literal["auto"] | DtypeName = "auto"
    target_modules: TargetModules = "all-linear"

    def __post_init__(self) -> None:
        from qlora.quant.blockwise import BLOCKSIZES

        check_fields(self)
        choices = ", ".join(map(str, BLOCKSIZES))
        require(self, "blocksize", self.blocksize in BLOCKSIZES, f"one of {choices}")
        _check_targets(self, "target_modules")


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
        pissa_niter: init="pissa" (the adapter starts at W's r principal singular
            directions, the rest is the frozen base; see qlora.nn.pissa): 0 takes an exact
            SVD, n > 0 a randomized one with n subspace iterations (PEFT's "pissa_niter_n":
            seconds instead of minutes on large matrices).
        loftq_iters: alternating quantize / truncated-SVD rounds of init="loftq". 1 keeps
            the base byte-identical to plain quantization (the adapter then works on any
            normally loaded base); more rounds change the base itself.
        bias: trainable biases; only "none" is supported (as in QLoRA).
        use_dora: DoRA (weight-decomposed LoRA): a trainable magnitude per output row times
            the direction of W + scaling·BA (over a k-bit base too: "QDoRA"). PEFT's
            use_dora; see qlora.nn.dora.
    """

    SECTION: ClassVar[str] = "lora"

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: TargetModules = "all-linear"
    exclude_modules: list[str] = field(default_factory=list)
    use_rslora: bool = False
    init: Literal["kaiming", "gaussian", "loftq", "pissa"] = "kaiming"
    loftq_iters: int = 1
    pissa_niter: int = 0
    bias: Literal["none"] = "none"
    use_dora: bool = False

    def __post_init__(self) -> None:
        check_fields(self)
        require(self, "r", self.r > 0, "a positive integer")
        require(self, "alpha", self.alpha > 0, "> 0 (the adapter's scale)")
        require(self, "dropout", 0.0 <= self.dropout < 1.0, "in [0, 1)")
        _check_targets(self, "target_modules")
        require(self, "exclude_modules", all(self.exclude_modules), "non-empty names")
        require(self, "loftq_iters", self.loftq_iters >= 1, ">= 1")
        require(self, "pissa_niter", self.pissa_niter >= 0, ">= 0 (0: exact SVD)")
        require(
            self, "use_dora", not (self.use_dora and self.init == "loftq"),
            "false with init=loftq (LoftQ refits A and B after the magnitude is set)",
        )  # fmt: skip

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

    SECTION: ClassVar[str] = "data"

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
        check_fields(self)
        require(self, "eval_path", self.eval_path != "", "a file path or null (none)")
        require(self, "eval_fraction", 0.0 <= self.eval_fraction < 1.0, "in [0, 1)")
        require(self, "max_seq_len", self.max_seq_len > 0, "a positive integer")
        require(self, "seed", self.seed >= 0, ">= 0")


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
            and unmap it when freed, serve smaller ones from its heap, and (with grad_ckpt)
            return the heap's free pages after every optimizer step (glibc otherwise keeps
            them: resident memory 1.4-2.7x the live tensors). Lower is leaner and slower:
            every mapped tensor is fresh memory, a page fault per 4 KiB (128: the leanest,
            1.5x slower steps on the default model). Process-wide; 0 leaves the allocator
            alone. See qlora.train.allocator.
        eval_every: evaluate every N optimizer steps (0: only at the end).
        save_every: checkpoint every N optimizer steps (0: only at the end).
        log_every: print a line every N steps (metrics.jsonl gets every step).
        seed: seeds Python, torch and the data order.
        tensorboard: also log to TensorBoard (needs the tensorboard package).
        adapter_dtype: precision of the final adapter in <output_dir>/adapter: "float32",
            "bfloat16" or "float16" (plain PEFT files, half the size), or "int8" (blockwise
            absmax, about a quarter; only qlora loads it). Checkpoints stay float32.
        parallel: how a torchrun job of several processes splits the work: "ddp" (each rank
            a whole model, the adapters' gradients all-reduced), "fsdp" (FSDP2: the k-bit base,
            the adapters and the optimizer state sharded across ranks; the base travels as its
            packed bytes; needs train.optim=adamw), "auto" (ddp when torchrun started more
            than one process), "none" (refuses to run under such a job). A plain
            ``qlora train`` is one process whatever this says. ``batch_size`` is per rank:
            the global batch is batch_size x grad_accum x world size. See qlora.train.parallel.
        cpu_offload: with parallel "fsdp" on CUDA ranks, keep each rank's shards (base,
            adapters, their gradients, AdamW's moments) in host memory and copy a layer to
            the GPU for its all-gather (FSDP2's CPUOffloadPolicy): a bigger base per GPU, at
            the cost of PCIe traffic and an optimizer step on the CPU.
    """

    SECTION: ClassVar[str] = "train"

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
    optim: OptimizerName = "adamw"
    optim_page_mb: int = 64
    optim_dir: str = ""
    grad_ckpt: bool = False
    loss_chunk: int = 256
    malloc_mmap_kb: int = 8192
    eval_every: int = 0
    save_every: int = 0
    log_every: int = 10
    seed: int = 0
    tensorboard: bool = False
    adapter_dtype: AdapterDtype = "float32"
    parallel: ParallelMode = "auto"
    cpu_offload: bool = False

    def __post_init__(self) -> None:
        check_fields(self)
        require(self, "output_dir", bool(self.output_dir), "a directory name")
        for name in ("batch_size", "grad_accum", "loss_chunk", "optim_page_mb", "log_every"):
            require(self, name, getattr(self, name) > 0, "a positive integer")
        for name in ("max_steps", "warmup_steps", "eval_every", "save_every", "malloc_mmap_kb"):
            require(self, name, getattr(self, name) >= 0, ">= 0")
        if self.max_steps == 0:  # epochs decides the length of the run
            require(self, "epochs", self.epochs > 0, "> 0 (or set train.max_steps)")
        require(self, "epochs", self.epochs >= 0, ">= 0")
        require(self, "lr", self.lr > 0, "> 0")
        require(self, "weight_decay", self.weight_decay >= 0, ">= 0")
        require(self, "max_grad_norm", self.max_grad_norm >= 0, ">= 0 (0: no clipping)")
        require(self, "seed", self.seed >= 0, ">= 0")


@dataclass
class ModelConfig:
    """Which base model, and where it runs.

    Attributes:
        source: a registered name (default smollm2-135m), a Hugging Face directory, a .gguf
            file or a directory saved pre-quantized by bitsandbytes (see qlora.load_model).
        dtype: dtype of the parts kept in full precision ("auto": float32 on CPU, bfloat16
            on CUDA).
        device: "auto" (CUDA when available), "cpu" or "cuda[:N]".
        trust_remote_code: run the Python code a model folder ships (its config's
            ``auto_map``). Off: such a model is refused with a clear error; turn it on only
            after reading that code.
    """

    SECTION: ClassVar[str] = "model"

    source: str = "smollm2-135m"
    dtype: Literal["auto"] | DtypeName = "auto"
    device: str = "auto"
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        check_fields(self)
        require(self, "source", bool(self.source), "a model name, directory or file")
        _check_device(self.device)


def _check_device(device: str) -> None:
    """ "auto", "cpu", or a CUDA device that exists here (checked now, not at load time)."""
    from qlora.devices import DeviceError, resolve_device  # imports torch: only when checked

    try:
        resolve_device(device)
    except DeviceError as err:
        raise ConfigError(f"model.device={err}") from None


@dataclass
class GenerationConfig:
    """Decoding settings of ``qlora generate``, ``qlora chat`` and `qlora.generate`.

    Attributes:
        max_new_tokens: at most this many tokens are generated (fewer when EOS comes first).
        temperature: 0 decodes greedily (deterministic); > 0 samples from softmax(logits /
            temperature): higher is more random.
        top_p: when sampling, draw only from the most likely tokens whose probabilities add
            up to top_p (nucleus sampling); in (0, 1], 1 keeps every token.
    """

    SECTION: ClassVar[str] = "generation"

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 0.9

    def __post_init__(self) -> None:
        check_fields(self)
        require(self, "max_new_tokens", self.max_new_tokens > 0, "a positive integer")
        require(self, "temperature", self.temperature >= 0, ">= 0 (0: greedy)")
        require(self, "top_p", 0 < self.top_p <= 1, "in (0, 1]")


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


def _check_run(config: RunConfig) -> None:
    """Rules that join two sections (each section checked its own values already)."""
    if config.lora.init == "loftq" and config.quant.kind is None:
        raise ConfigError(
            "lora.init='loftq' fits the adapter to the quantization error, but quant.kind is "
            "null; set a quant.kind (e.g. nf4) or another lora.init"
        )
    if config.lora.init == "pissa" and config.quant.kind == "gguf":
        raise ConfigError(
            "lora.init='pissa' quantizes the residual of the split, but quant.kind='gguf' "
            "keeps a GGUF file's blocks as they are; set quant.kind nf4 (QPiSSA) or null"
        )


def check_data_files(data: DataConfig) -> None:
    """The files a training run reads exist: ``data.path`` (required) and ``data.eval_path``.

    Not part of parsing (a recipe may be written where its data is not), but run before a
    model loads, so that a typo in a path costs no loading time.

    Raises:
        ConfigError: a path that is not set or not a file.
    """
    if not data.path:
        raise ConfigError(
            "data.path is not set: give the training data (a JSON or JSONL file), e.g. "
            "--set data.path=train.jsonl"
        )
    for name in ("path", "eval_path"):
        path = getattr(data, name)
        if path is not None and not os.path.isfile(path):
            what = "a directory, not a file" if os.path.isdir(path) else "no such file"
            raise ConfigError(f"data.{name}={path!r}: {what}")


# -- YAML ------------------------------------------------------------------------------------


def _yaml_loader() -> type:
    """yaml.SafeLoader that refuses duplicate keys (YAML would keep the last one silently)."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
            seen: list[Any] = []  # a list: YAML keys may be unhashable ([a, b]: 1)
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r}", key_node.start_mark
                    )
                seen.append(key)
            return super().construct_mapping(node, deep=deep)

    return Loader


def _yaml_problem(err: Exception) -> str:
    """One line for a YAML error: ``line L, column C: <problem> (<context> at line L')``."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    context = getattr(err, "context", None)
    context_mark = getattr(err, "context_mark", None)
    text = problem
    if context:
        where = f" at line {context_mark.line + 1}" if context_mark is not None else ""
        text += f" ({context}{where})"
    if mark is not None:
        text = f"line {mark.line + 1}, column {mark.column + 1}: {text}"
    return " ".join(text.split())  # yaml's messages span lines; the CLI prints only the first


def _read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.load(f, Loader=_yaml_loader())  # a SafeLoader: no objects
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (not UTF-8)") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the config file ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(err)}") from None
    values = values or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected sections {', '.join(_SECTIONS)} at the top")
    return values


def _parse_override(item: str) -> tuple[str, str, Any]:
    """``section.key=value`` -> (section, key, YAML-parsed value)."""
    import yaml

    if "=" not in item or "." not in item.split("=", 1)[0]:
        raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. train.lr=1e-4")
    dotted, raw = item.split("=", 1)
    section, key = dotted.split(".", 1)
    try:
        return section, key, yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {item!r}: not a valid YAML value: {_yaml_problem(err)}") from None


def load_run_config(
    path: str | os.PathLike[str] | None = None, overrides: list[str] | None = None
) -> RunConfig:
    """Read a recipe YAML (sections model, quant, lora, data, train) and apply overrides.

    Every value is checked here (types, ranges, choices, regexes, the device), before any
    model is loaded.

    Args:
        path: the YAML file (None: all defaults).
        overrides: ``section.key=value`` strings; values are parsed as YAML (1e-4, true, [a, b]).

    Raises:
        ConfigError: a missing or unreadable file, malformed YAML (with the line), an unknown
            section or key, a bad value; the message names it and lists the valid ones.
    """
    values = _read_yaml(path) if path is not None else {}
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
    config = RunConfig(**sections)
    _check_run(config)
    return config


def from_dict(cls: type[T], values: dict[str, Any], section: str = "") -> T:
    """Build config dataclass ``cls`` from a mapping, rejecting unknown keys and bad values."""
    hints = field_types(cls)
    prefix = f"{section or getattr(cls, 'SECTION', '')}."
    values = dict(values)
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(
                f"unknown config key {prefix + key!r}; valid keys: {', '.join(hints)}"
            )
        if hints[key] is float and isinstance(value, str):
            # YAML 1.1 reads 1e-4 (no dot) as a string; accept it as the number it means.
            with contextlib.suppress(ValueError):
                values[key] = float(value)
    return cls(**values)
