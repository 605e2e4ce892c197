"""Merge adapters into the base and export a plain full-precision Hugging Face checkpoint.

The exported directory (``config.json`` without any ``quantization_config``,
``model.safetensors``, ``generation_config.json``, tokenizer files) loads with nothing but
``transformers.AutoModelForCausalLM.from_pretrained``.

Each adapted layer's weight is `qlora.nn.merged_weight` - the same function `qlora.merge`
uses - so for a QLoRA adapter the delta scaling·B@A is added to the *dequantized* 4-bit
weight, the weight the adapter was trained against. Adding it to the original 16-bit
weight instead would silently change the model by the quantization error. Quantized layers
without an adapter are dequantized too, so the export holds no 4-bit tensors.

Where it writes: as `qlora.models.save_quantized` - a new or empty directory, an existing
one only with ``overwrite=True`` (then only the files written here are replaced), never
the directory the base was loaded from (overwriting the base you merge from loses it);
the rule is `qlora.models.destination`'s.

Nothing here modifies the model: tensors are computed one at a time and streamed into the
file, so exporting needs the memory of the largest merged tensor, not of the whole model.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qlora.files import staged_directory
from qlora.models.destination import MODEL_FILES, check_model_destination
from qlora.models.safetensors_io import write_safetensors
from qlora.nn.cast_linear import CastLinear
from qlora.nn.inject import float32_compute
from qlora.nn.lora import LoRALinear, base_weight_dtype, merged_weight
from qlora.nn.qlinear import QuantLinear

__all__ = [
    "ExportError",
    "ExportReport",
    "MergePlan",
    "MergedTensor",
    "export_merged",
    "measure_drift",
    "merge_plan",
    "merged_state_dict",
]

WEIGHTS_NAME = "model.safetensors"


class ExportError(ValueError):
    """The export cannot be written as asked; the message says which file or name and why."""


@dataclass(frozen=True)
class MergedTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    make: Callable[[], torch.Tensor]


@dataclass
class MergePlan:
    entries: list[MergedTensor]
    merged_layers: int
    dequantized_layers: int
    untie: bool  # the output head got its own merged weight while the config ties it


@dataclass(frozen=True)
class ExportReport:
    """What `export_merged` wrote; ``drift`` is max |logit difference| when it was checked."""

    directory: Path
    tensors: int
    nbytes: int
    merged_layers: int
    dequantized_layers: int
    drift: float | None = None

    def __str__(self) -> str:
        drift = (
            "" if self.drift is None else f"; max |logit drift| vs base+adapter {self.drift:.3g}"
        )
        return (
            f"exported {self.tensors} tensors ({self.nbytes / 2**20:.1f} MiB) to {self.directory}: "
            f"{self.merged_layers} LoRA layers merged, {self.dequantized_layers} quantized "
            f"layers dequantized{drift}"
        )


def _owner(key: str, special: dict[str, nn.Module]) -> str | None:
    """The LoRALinear / QuantLinear prefix a state-dict key belongs to, if any."""
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in special:
            return prefix
    return None


def _base_of(layer: LoRALinear) -> nn.Module:
    """The layer's real base: the QuantLinear set aside while merged in place, if any."""
    return layer._unmerged_base if layer._unmerged_base is not None else layer.base_layer


def _names(model: nn.Module, adapter: str | Iterable[str] | None) -> list[str] | None:
    if adapter is None:
        return None
    names = [adapter] if isinstance(adapter, str) else list(adapter)
    known = {a for m in model.modules() if isinstance(m, LoRALinear) for a in m.adapter_names}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ExportError(f"unknown adapter(s) {unknown}; the model has {sorted(known) or 'none'}")
    return names


def _layer_entries(
    prefix: str, module: nn.Module, names: list[str] | None, dtype: torch.dtype | None
) -> list[MergedTensor]:
    if isinstance(module, LoRALinear):
        base = _base_of(module)
        wanted = None if names is None else [n for n in names if n in module.lora_A]
        target = dtype or base_weight_dtype(base)

        def weight() -> torch.Tensor:
            return merged_weight(module, wanted).to(target)  # [out, in]

    else:
        assert isinstance(module, QuantLinear)
        base = module
        target = dtype or base_weight_dtype(base)

        def weight() -> torch.Tensor:
            return module.dequantized_weight(torch.float32).to(target)  # [out, in]

    entries = [
        MergedTensor(f"{prefix}.weight", target, (base.out_features, base.in_features), weight)
    ]
    bias = base.bias
    if bias is not None:
        bias_dtype = dtype or bias.dtype
        entries.append(
            MergedTensor(
                f"{prefix}.bias",
                bias_dtype,
                tuple(bias.shape),
                lambda: bias.detach().to(bias_dtype),
            )
        )
    return entries


def merge_plan(
    model: nn.Module, adapter: str | Iterable[str] | None, dtype: torch.dtype | None
) -> MergePlan:
    """Every tensor of the merged checkpoint, in state-dict order, computed lazily."""
    names = _names(model, adapter)
    special: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear | QuantLinear) and _owner(name + ".x", special) is None:
            special[name] = module
    entries: list[MergedTensor] = []
    seen: dict[int, str] = {}
    emitted: set[str] = set()
    # an unadapted CastLinear's bf16 weight goes out in the dtype the model computes in
    widened = {id(m.weight): m.full_dtype for m in model.modules() if isinstance(m, CastLinear)}
    for key, tensor in model.state_dict(keep_vars=True).items():
        owner = _owner(key, special)
        if owner is not None:
            if owner not in emitted:
                emitted.add(owner)
                entries.extend(_layer_entries(owner, special[owner], names, dtype))
            continue
        if id(tensor) in seen:  # tied (e.g. lm_head = embed_tokens): written once, as HF does
            continue
        seen[id(tensor)] = key
        target = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        if dtype is None and id(tensor) in widened:
            target = widened[id(tensor)]
        entries.append(
            MergedTensor(
                key, target, tuple(tensor.shape), lambda t=tensor, d=target: t.detach().to(d)
            )
        )
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = getattr(model, "config", None)
    untie = bool(getattr(config, "tie_word_embeddings", False)) and isinstance(head, LoRALinear)
    return MergePlan(
        entries=entries,
        merged_layers=sum(isinstance(m, LoRALinear) for m in special.values()),
        dequantized_layers=sum(
            isinstance(m, QuantLinear)
            or (isinstance(m, LoRALinear) and isinstance(_base_of(m), QuantLinear))
            for m in special.values()
        ),
        untie=untie,
    )


@torch.no_grad()
def merged_state_dict(
    model: nn.Module,
    adapter: str | Iterable[str] | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """The Hugging Face state dict of ``model`` with adapters merged; ``model`` is unchanged.

    Args:
        model: a model with LoRA layers and/or QuantLinear layers.
        adapter: adapter name(s) to fold in; None: what the model computes now (the active
            adapters of each layer, none where disabled).
        dtype: cast floating tensors to this; default: each weight's original dtype (a
            QuantLinear's pre-quantization dtype).

    Returns:
        Keys as in the plain model's checkpoint (``...q_proj.weight``), tied weights once.
    """
    return {e.name: e.make() for e in merge_plan(model, adapter, dtype).entries}


def _config(model: nn.Module, plan: MergePlan) -> Any:
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")  # the export is full precision
    counts: Counter[torch.dtype] = Counter()
    for entry in plan.entries:
        if entry.dtype.is_floating_point:
            counts[entry.dtype] += int(torch.Size(entry.shape).numel())
    if counts:
        config.dtype = counts.most_common(1)[0][0]
    if not getattr(config, "architectures", None):
        config.architectures = [type(model).__name__]
    if plan.untie:
        config.tie_word_embeddings = False
    return config


@torch.no_grad()
def export_merged(
    model: nn.Module,
    directory: str | os.PathLike,
    tokenizer: Any = None,
    *,
    adapter: str | Iterable[str] | None = None,
    dtype: torch.dtype | None = None,
    check_input_ids: torch.Tensor | None = None,
    verbose: bool = True,
    overwrite: bool = False,
) -> ExportReport:
    """Write ``model`` with its adapters merged as a full-precision Hugging Face checkpoint.

    ``model`` (a transformers causal LM, possibly quantized and with adapters) is not
    modified. The files are written into a temporary directory and moved into place when
    complete (see `qlora.files.staged_directory`), with the user's umask.

    Args:
        model: the model; needs ``model.config`` (a transformers config).
        directory: a new or empty directory (created when missing).
        tokenizer: saved alongside when given (anything with ``save_pretrained``).
        adapter: adapter name(s) to merge; None: the currently active ones.
        dtype: dtype of the written tensors; default: each weight's original dtype.
        check_input_ids: token ids [batch, seq] or [seq]; when given, the written checkpoint
            is loaded back with transformers and `measure_drift` against ``model`` is
            reported (costs a second full-precision copy of the model in memory); ``model``
            computes in float32 for it (`float32_compute`), so a bf16 compute dtype's
            rounding is not counted as the merge's drift.
        verbose: print the report line.
        overwrite: write into a directory that holds other files: replace only the files
            written here (``config.json``, ``generation_config.json``, ``model.safetensors``,
            tokenizer files) and keep every other. Refused even so: the directory the base
            was loaded from (``model.qlora_load_info.directory``, or transformers'
            ``config._name_or_path``), and one holding weights, adapters or tokenizer files
            the new files would not replace - they are named, never deleted.

    Returns:
        An `ExportReport`.

    Raises:
        ExportError: unknown adapter name, or not a transformers model.
        qlora.files.DestinationError: the destination is refused, as above.
    """
    directory = Path(directory)
    if not hasattr(model, "config"):
        raise ExportError(
            f"{type(model).__name__} has no .config; export needs a transformers model"
        )
    plan = merge_plan(model, adapter, dtype)
    check_model_destination(directory, model, overwrite, "the base model")
    config = _config(model, plan)
    nbytes = sum(int(torch.Size(e.shape).numel()) * e.dtype.itemsize for e in plan.entries)
    with staged_directory(directory, last=["config.json"], stale=MODEL_FILES) as staging:
        write_safetensors(
            staging / WEIGHTS_NAME,
            ((e.name, e.make()) for e in plan.entries),
            {"format": "pt"},
            specs=[(e.name, e.dtype, e.shape) for e in plan.entries],
        )
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            try:
                generation.save_pretrained(staging)
            except ValueError as err:  # transformers validates it; a bad one must not block
                warnings.warn(f"generation_config not exported: {err}", stacklevel=2)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        config.save_pretrained(staging)
    drift = None
    if check_input_ids is not None:
        from transformers import AutoModelForCausalLM

        merged = AutoModelForCausalLM.from_pretrained(
            directory, dtype=config.dtype, trust_remote_code=False
        )
        with float32_compute(model):  # the merge's error, not bf16 compute's rounding
            drift = measure_drift(model, merged, check_input_ids)
        del merged
    report = ExportReport(
        directory, len(plan.entries), nbytes, plan.merged_layers, plan.dequantized_layers, drift
    )
    if verbose:
        print(report)
    return report


@torch.no_grad()
def measure_drift(
    model_with_adapter: nn.Module, merged_model: nn.Module, input_ids: torch.Tensor
) -> float:
    """Max |logit difference| between two causal LMs on ``input_ids`` ([batch, seq] or [seq]).

    Both run in eval mode (LoRA dropout would otherwise add noise); their previous train/eval
    modes are restored afterwards.
    """
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    ids = ids.unsqueeze(0) if ids.dim() == 1 else ids
    logits = []
    for model in (model_with_adapter, merged_model):
        was_training = model.training
        model.eval()
        try:
            device = next(model.parameters()).device
            logits.append(model(input_ids=ids.to(device)).logits.float().cpu())
        finally:
            model.train(was_training)
    return float((logits[0] - logits[1]).abs().max())
