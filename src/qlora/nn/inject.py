"""Put adapters and quantized layers into a model: select targets, wrap, freeze, report.

Target selection is shared by LoRA (`add_lora`) and quantization (`quantize_model`), so
``target_modules`` means the same thing in both configs:

* ``"all-linear"``: every Linear (``nn.Linear`` or `QuantLinear`) except the output head.
  The head is what ``model.get_output_embeddings()`` returns, else a module named
  ``lm_head``; adapting or quantizing it costs a lot (vocab x hidden) for little gain.
* a list of names: PEFT's rule - a module matches if its full name equals the entry or ends
  with ``"." + entry`` (so ``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``).
* any other string: a regular expression that must match the *full* module name
  (``re.fullmatch``), as in PEFT.

Only Linear-like modules are ever candidates; a LoRALinear counts as one (so a second
adapter lands on the same layer) and its inner Linears (``base_layer``, ``lora_A.*``,
``lora_B.*``) never do.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from qlora.config import LoraConfig, QuantConfig
from qlora.nn.cast_linear import CastLinear
from qlora.nn.lora import LoRALinear, base_weight_dtype, merged_weight
from qlora.nn.qlinear import QuantLinear

__all__ = [
    "TrainableReport",
    "activate_lora",
    "add_configured_adapter",
    "add_lora",
    "disable_adapters",
    "find_targets",
    "float32_compute",
    "frozen_compute_dtype",
    "lora_layers",
    "merge",
    "quantize_model",
    "replace_module",
    "set_adapter",
    "trainable_report",
]

_LINEAR_TYPES = (nn.Linear, QuantLinear, LoRALinear)


def _linear_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(full name, module) of every Linear-like module, not descending into LoRALinear."""
    found: list[tuple[str, nn.Module]] = []
    inside_lora: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside_lora):
            continue
        if isinstance(module, LoRALinear):
            inside_lora.append(name)
            found.append((name, module))
        elif isinstance(module, _LINEAR_TYPES):
            found.append((name, module))
    return found


def _output_head(model: nn.Module) -> nn.Module | None:
    """The output projection: ``get_output_embeddings()`` if the model has it, else None."""
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        try:
            head = getter()
        except (AttributeError, NotImplementedError):
            head = None
        if isinstance(head, nn.Module):
            return head
    return None


def _matches(name: str, patterns: str | Sequence[str]) -> bool:
    """PEFT's rule: a string is a full-name regex; a list holds full names or name suffixes."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def find_targets(
    model: nn.Module,
    target_modules: str | Sequence[str],
    exclude: str | Sequence[str] = (),
) -> list[str]:
    """Full names of the Linear-like modules selected by ``target_modules`` minus ``exclude``.

    Args:
        model: any module tree.
        target_modules: "all-linear", a list of names/suffixes, or a full-name regex.
        exclude: names/suffixes (list) or a full-name regex (string) never to select.

    Returns:
        Names in ``model.named_modules()`` order.

    Raises:
        ValueError: nothing matched; the message names the targets and lists some of the
            Linear layers that do exist.
    """
    candidates = _linear_modules(model)
    if isinstance(target_modules, str) and target_modules == "all-linear":
        head = _output_head(model)
        if head is not None:
            selected = [n for n, m in candidates if m is not head]
        else:
            selected = [n for n, _ in candidates if n.rsplit(".", 1)[-1] != "lm_head"]
    else:
        if not isinstance(target_modules, str):
            target_modules = list(target_modules)
        selected = [n for n, _ in candidates if _matches(n, target_modules)]
        if not isinstance(target_modules, str) and selected:
            unused = [t for t in target_modules if not any(_matches(n, [t]) for n in selected)]
            if unused:
                warnings.warn(f"target_modules {unused} matched no Linear layer", stacklevel=2)
    if exclude:
        exclude = exclude if isinstance(exclude, str) else list(exclude)
        selected = [n for n in selected if not _matches(n, exclude)]
    if not selected:
        names = [n for n, _ in candidates]
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise ValueError(
            f"target_modules={target_modules!r} (exclude={exclude!r}) matched no Linear layer. "
            f"The model has {len(names)} Linear layers"
            + (f", e.g. {shown}; their names end in: {', '.join(leaves)}" if names else "")
        )
    return selected


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at dotted path ``name`` in ``model``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """(full name, layer) for every LoRALinear in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def frozen_compute_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype the frozen base's matmuls run in: the first k-bit layer's compute dtype, or
    the first adapted plain Linear's weight dtype; None for a model with neither."""
    for module in model.modules():
        if isinstance(module, QuantLinear | CastLinear):
            return module.compute_dtype
        if isinstance(module, LoRALinear):
            base = module.base_layer
            if isinstance(base, QuantLinear | CastLinear):
                return base.compute_dtype
            if isinstance(base, nn.Linear):
                return base.weight.dtype
    return None


@contextlib.contextmanager
def float32_compute(model: nn.Module) -> Iterator[nn.Module]:
    """Within this block every k-bit layer and `CastLinear` multiplies in float32 (their stored
    weights unchanged): what a merged float32 export computes, so that comparing the two
    measures the merge and not bf16 rounding. The compute dtypes are restored on exit."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear | CastLinear)]
    before = [m.compute_dtype for m in layers]
    try:
        for module in layers:
            module.compute_dtype = torch.float32
        yield model
    finally:
        for module, dtype in zip(layers, before, strict=True):
            module.compute_dtype = dtype


@dataclass(frozen=True)
class TrainableReport:
    """How many parameters train, out of how many.

    ``total`` counts a QuantLinear's weight as out*in logical parameters (it is stored as
    packed bytes in buffers), so the numbers compare with the unquantized model's.
    """

    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return (
            f"trainable params: {self.trainable:,d} || all params: {self.total:,d} "
            f"|| trainable%: {self.percent:.4f}"
        )


def trainable_report(model: nn.Module) -> TrainableReport:
    """Count trainable and all parameters (shared/tied parameters once)."""
    trainable = total = 0
    for param in model.parameters():  # parameters() already de-duplicates tied weights
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    for module in model.modules():
        if isinstance(module, QuantLinear):
            total += module.out_features * module.in_features
    return TrainableReport(trainable=trainable, total=total)


def set_adapter(model: nn.Module, name: str | Iterable[str]) -> None:
    """Activate adapter(s) ``name`` in every LoRA layer that has them; freeze all others.

    A layer that has none of the names ends up with no active adapter (base output only),
    which is right when adapters target different layers.

    Raises:
        ValueError: a name exists in no layer.
    """
    names = [name] if isinstance(name, str) else list(name)
    layers = [layer for _, layer in lora_layers(model)]
    known = {n for layer in layers for n in layer.adapter_names}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(
            f"unknown adapter(s) {unknown}; the model has {sorted(known) or 'no adapters'}"
        )
    for layer in layers:
        layer.set_adapter([n for n in names if n in layer.lora_A])


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: the model computes its base output only; the previous state returns on
    exit, also when the body raises.

    Example:
        with disable_adapters(model):
            reference_logits = model(ids).logits
    """
    layers = [layer for _, layer in lora_layers(model)]
    previous = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, flag in zip(layers, previous, strict=True):
            layer.disabled = flag


def add_lora(
    model: nn.Module,
    config: LoraConfig,
    adapter_name: str = "default",
) -> nn.Module:
    """Wrap ``config.target_modules`` in LoRALinear, freeze the rest, activate the adapter.

    Targets that already are LoRALinear get ``adapter_name`` as an additional adapter. Every
    parameter that is not a LoRA A/B weight is frozen (biases included: ``bias="none"``), and
    the new adapter becomes the only active - hence only trainable - one. The config is
    recorded in ``model.lora_configs[adapter_name]`` (what an adapter file's
    ``adapter_config.json`` is written from).

    This only wraps and initializes; the caller reports (``print(trainable_report(model))``).
    ``config.init == "loftq"`` starts the adapters as "kaiming" here: LoftQ is a separate
    step, `qlora.nn.loftq.init_loftq`, called next on the still full-precision model.

    Returns:
        ``model``, modified in place.
    """
    if config.bias != "none":
        raise ValueError(f"lora.bias={config.bias!r} is not supported; only 'none'")
    for name in find_targets(model, config.target_modules, config.exclude_modules):
        module = model.get_submodule(name)
        if isinstance(module, LoRALinear):
            layer = module
        else:
            layer = LoRALinear(module)
            layer.train(module.training)  # follow the model's mode (eval after load_model)
            replace_module(model, name, layer)
        add_configured_adapter(layer, adapter_name, config)
    return activate_lora(model, adapter_name, config)


def add_configured_adapter(layer: LoRALinear, adapter_name: str, config: LoraConfig) -> None:
    """``layer.add_adapter`` as ``config`` says (``init`` "loftq" and "pissa" start as
    "kaiming": their own step, init_loftq / init_pissa, sets A and B next)."""
    layer.add_adapter(
        adapter_name,
        r=config.r,
        alpha=config.alpha,
        dropout=config.dropout,
        use_rslora=config.use_rslora,
        init="kaiming" if config.init in ("loftq", "pissa") else config.init,
        use_dora=config.use_dora,
    )


def activate_lora(model: nn.Module, adapter_name: str, config: LoraConfig) -> nn.Module:
    """`add_lora`'s last step: everything but the LoRA weights frozen, ``adapter_name`` the
    active adapter, ``config`` recorded in ``model.lora_configs``. Returns ``model``."""
    _freeze_all_but_lora(model)
    set_adapter(model, adapter_name)
    configs: dict[str, LoraConfig] = dict(getattr(model, "lora_configs", None) or {})
    configs[adapter_name] = config
    model.lora_configs = configs
    return model


def _freeze_all_but_lora(model: nn.Module) -> None:
    """``requires_grad=False`` on every parameter that is not a LoRA A or B weight."""
    lora_params = {
        id(p)
        for _, layer in lora_layers(model)
        for p in [*layer.lora_A.parameters(), *layer.lora_B.parameters()]
    }
    for param in model.parameters():
        if id(param) not in lora_params:
            param.requires_grad_(False)


def quantize_model(model: nn.Module, config: QuantConfig) -> nn.Module:
    """Replace the target ``nn.Linear`` layers by `QuantLinear` in place (``kind=None``: no-op).

    Layers that already are QuantLinear are left alone. Quantize before `add_lora`: a
    LoRALinear target is an error, because its base may hold merged deltas or train.

    Returns:
        ``model``.
    """
    if config.kind is None:
        return model
    if config.kind == "gguf":
        raise ValueError(
            "quant.kind='gguf' keeps a .gguf file's own blocks, read when the model loads "
            "(load_model(path.gguf, 'gguf')); it cannot quantize a model already in memory"
        )
    for name in find_targets(model, config.target_modules):
        module = model.get_submodule(name)
        if isinstance(module, LoRALinear):
            raise ValueError(f"{name} already has LoRA adapters; call quantize_model first")
        if isinstance(module, QuantLinear):
            continue
        quantized = QuantLinear.from_linear(
            module,
            kind=config.kind,
            blocksize=config.blocksize,
            double_quant=config.double_quant,
            compute_dtype=config.compute_dtype,
        )
        quantized.train(module.training)  # a model in eval mode stays so (adapters follow it)
        replace_module(model, name, quantized)
    return model


@torch.no_grad()
def merge(model: nn.Module, adapter: str | Iterable[str] | None = None) -> nn.Module:
    """Fold adapters into the bases and replace every LoRALinear by a plain ``nn.Linear``.

    Each new Linear holds `merged_weight` (a QuantLinear base is dequantized, never
    re-quantized) cast to the base's original weight dtype, keeps the base bias, and is frozen
    like the base was. The model then computes what it computed before (to float tolerance,
    in eval mode) without any adapter code.

    Args:
        model: modified in place.
        adapter: adapter name(s) to fold in; None means each layer's active adapters (none
            for a disabled layer), i.e. exactly what the model computes now.

    Returns:
        ``model``.
    """
    names = None if adapter is None else ([adapter] if isinstance(adapter, str) else list(adapter))
    for name, layer in list(lora_layers(model)):
        wanted = None if names is None else [n for n in names if n in layer.lora_A]
        weight = merged_weight(layer, wanted)  # [out, in]
        base = layer._unmerged_base if layer._unmerged_base is not None else layer.base_layer
        bias = base.bias
        dense = nn.Linear(
            layer.in_features,
            layer.out_features,
            bias=bias is not None,
            device=weight.device,
            dtype=base_weight_dtype(base),
        )
        dense.weight.copy_(weight)
        if bias is not None:
            dense.bias.copy_(bias)
        dense.requires_grad_(False)
        replace_module(model, name, dense)
    if hasattr(model, "lora_configs"):
        model.lora_configs = {}
    return model
