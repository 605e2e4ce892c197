"""Adapter files in PEFT's layout, so adapters move freely between qlora and PEFT.

A directory holds two files:

* ``adapter_config.json``: PEFT 0.21's ``LoraConfig`` as PEFT itself writes it (every key,
  ``null`` for unused features, ``inference_mode: true``), with ``target_modules`` the
  shortest name suffixes that select exactly the adapted layers - leaf names such as
  ``"q_proj"`` when every layer of that name is adapted, longer dotted suffixes otherwise -
  and ``rank_pattern`` / ``alpha_pattern`` for layers whose rank or alpha differ from the
  most common one.
* ``adapter_model.safetensors``: ``base_model.model.<module>.lora_A.weight`` [r, in] and
  ``...lora_B.weight`` [out, r]; no adapter name in the key (PEFT strips it on save).

Saving replaces a previous adapter in the directory (its two files are ours to replace);
a directory holding anything else is refused unless ``overwrite=True`` (which keeps those
files), and one holding a full model is always refused.

Loading trusts the *weights* for which layers are adapted (a key names its module exactly)
and the config for ranks, alphas and dropout. Everything is validated (finite values too)
before the model is touched, so a bad file leaves the model as it was.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qlora.adapters._peft_files import (
    CONFIG_NAME,
    PREFIX,
    WEIGHTS_NAME,
    AdapterFormatError,
    AdapterNotFoundError,
    check_finite,
    find_files,
    match_weights,
    parse_config,
    read_weights,
)
from qlora.config import ConfigError, LoraConfig
from qlora.files import check_destination, staged_directory
from qlora.models.destination import refuse_model_directory
from qlora.models.safetensors_io import write_safetensors
from qlora.nn.inject import add_lora, lora_layers, set_adapter
from qlora.nn.lora import LoRALinear

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "AdapterFormatError",
    "AdapterNotFoundError",
    "adapter_config",
    "load_adapter",
    "save_adapter",
]


# What PEFT 0.21.2 writes for a plain LoRA, minus the values that vary (filled in below).
# peft_version is left out on purpose: PEFT fills in its own version on load.
_PEFT_DEFAULTS: dict[str, Any] = {
    "alora_invocation_tokens": None,
    "alpha_pattern": {},
    "arrow_config": None,
    "auto_mapping": None,
    "base_model_name_or_path": None,
    "bias": "none",
    "corda_config": None,
    "ensure_weight_tying": False,
    "eva_config": None,
    "exclude_modules": None,
    "fan_in_fan_out": False,
    "inference_mode": True,
    "init_lora_weights": True,
    "kasa_config": None,
    "layer_replication": None,
    "layers_pattern": None,
    "layers_to_transform": None,
    "loftq_config": {},
    "lora_alpha": 8,
    "lora_bias": False,
    "lora_dropout": 0.0,
    "lora_ga_config": None,
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "modules_to_save": None,
    "monteclora_config": None,
    "peft_type": "LORA",
    "qalora_group_size": 16,
    "r": 8,
    "rank_pattern": {},
    "revision": None,
    "target_modules": None,
    "target_parameters": None,
    "task_type": "CAUSAL_LM",
    "trainable_token_indices": None,
    "use_bdlora": None,
    "use_dora": False,
    "use_qalora": False,
    "use_rslora": False,
    "velora_config": None,
}

# -- saving -------------------------------------------------------------------------------------


def _most_common(values: list[Any]) -> Any:
    """The most frequent value; ties go to the one seen first (model order)."""
    return Counter(values).most_common(1)[0][0]


def _clean_number(value: float) -> int | float:
    """alpha recovered from a float scaling: drop rounding noise, write ints as ints (as PEFT)."""
    value = float(f"{value:.12g}")
    return int(value) if value.is_integer() else value


def _minimal_suffixes(targets: list[str], model: nn.Module) -> list[str]:
    """Shortest dotted suffix of each target that matches no other module, sorted.

    PEFT selects a module when its name equals a ``target_modules`` entry or ends with
    ``"." + entry``, so each suffix must stay clear of every module that is not a target.
    """
    inner: list[str] = [n for n, _ in lora_layers(model)]
    wanted = set(targets)
    others = [
        name
        for name, _ in model.named_modules()
        if name and name not in wanted and not any(name.startswith(p + ".") for p in inner)
    ]
    chosen: set[str] = set()
    for target in targets:
        parts = target.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if not any(o == suffix or o.endswith("." + suffix) for o in others):
                chosen.add(suffix)
                break
    return sorted(chosen)


def _base_name(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", None) if config is not None else None
    if name:
        return str(name)
    info = getattr(model, "qlora_load_info", None)
    return str(info.source) if info is not None else None


def adapter_config(
    model: nn.Module, adapter: str = "default", base_model_name_or_path: str | None = None
) -> dict[str, Any]:
    """The ``adapter_config.json`` mapping `save_adapter` writes for ``adapter`` of ``model``.

    Raises:
        ValueError: no layer of ``model`` has adapter ``adapter``.
    """
    layers = _layers_with(model, adapter)
    recorded = (getattr(model, "lora_configs", None) or {}).get(adapter)
    use_rslora = bool(recorded.use_rslora) if recorded is not None else False
    ranks = {name: layer.lora_A[adapter].out_features for name, layer in layers}
    alphas = {
        name: _clean_number(
            layer.scaling[adapter] * (math.sqrt(ranks[name]) if use_rslora else ranks[name])
        )
        for name, layer in layers
    }
    dropouts = [getattr(layer.lora_dropout[adapter], "p", 0.0) for _, layer in layers]
    r, alpha = _most_common(list(ranks.values())), _most_common(list(alphas.values()))
    config = dict(_PEFT_DEFAULTS)
    config.update(
        base_model_name_or_path=base_model_name_or_path or _base_name(model),
        init_lora_weights="gaussian"
        if recorded is not None and recorded.init == "gaussian"
        else True,
        lora_alpha=alpha,
        lora_dropout=float(max(dropouts)),
        r=r,
        rank_pattern={n: v for n, v in ranks.items() if v != r},
        alpha_pattern={n: v for n, v in alphas.items() if v != alpha},
        target_modules=_minimal_suffixes([n for n, _ in layers], model),
        use_rslora=use_rslora,
    )
    return config


def _layers_with(model: nn.Module, adapter: str) -> list[tuple[str, LoRALinear]]:
    layers = [(n, layer) for n, layer in lora_layers(model) if adapter in layer.lora_A]
    if not layers:
        known = sorted({a for _, layer in lora_layers(model) for a in layer.adapter_names})
        raise ValueError(f"the model has no adapter {adapter!r}; it has {known or 'none'}")
    return layers


def save_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    adapter: str = "default",
    base_model_name_or_path: str | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write adapter ``adapter`` of ``model`` to ``directory`` in PEFT's layout.

    The files are written to a temporary directory first and moved into place only when
    complete (`qlora.files.staged_directory`), with the user's umask.

    Where it writes: a new or empty directory, or one holding only an adapter's two files
    (a previous save - training saves into ``<output_dir>/adapter`` on every run), which
    are replaced. A directory with any other file is refused unless ``overwrite``; then
    only the two adapter files are replaced and the others kept. A directory holding a
    model (``config.json``, weights) is refused even with ``overwrite``: an adapter beside
    it would change what ``from_pretrained`` loads from there.

    Args:
        model: a model with LoRA layers (from `qlora.add_lora` or `load_adapter`).
        directory: destination, created if missing.
        adapter: which adapter to save.
        base_model_name_or_path: recorded in the config for PEFT's ``AutoPeftModel``;
            default: the model's ``config._name_or_path`` or the source it was loaded from.
        overwrite: write beside other files, as above.

    Returns:
        ``Path(directory)``.

    Raises:
        ValueError: the model has no adapter ``adapter``.
        qlora.files.DestinationError: the destination is refused, as above.
    """
    config = adapter_config(model, adapter, base_model_name_or_path)
    refuse_model_directory(directory, "an adapter")
    check_destination(directory, overwrite=overwrite, ours=(CONFIG_NAME, WEIGHTS_NAME))
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in _layers_with(model, adapter):
        for ab, linear in (("A", layer.lora_A[adapter]), ("B", layer.lora_B[adapter])):
            tensors[f"{PREFIX}{name}.lora_{ab}.weight"] = linear.weight.detach().cpu()
    with staged_directory(directory, last=[CONFIG_NAME]) as staging:
        write_safetensors(staging / WEIGHTS_NAME, dict(sorted(tensors.items())))
        text = json.dumps(config, indent=2, sort_keys=True) + "\n"
        (staging / CONFIG_NAME).write_text(text, encoding="utf-8")
    return Path(directory)


# -- loading ------------------------------------------------------------------------------------


def load_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    name: str | None = None,
    trainable: bool = False,
) -> str:
    """Load a PEFT-format LoRA adapter into ``model`` as adapter ``name``.

    On a model without adapters this injects LoRA with `qlora.add_lora` (config from the
    file; target layers: exactly those the weights file names) and the adapter becomes
    active. On a model that already has adapters it is added next to them and, as in PEFT's
    ``load_adapter``, the active adapters stay as they are: switch with `qlora.set_adapter`.

    Args:
        model: the base model, plain or quantized (`QuantLinear`), with or without adapters.
        directory: holds ``adapter_config.json`` and ``adapter_model.safetensors``.
        name: adapter name; default ``"default"`` (an error if that name is taken).
        trainable: make the adapter active and trainable (to continue training it);
            otherwise its parameters are frozen.

    Returns:
        The adapter's name.

    Raises:
        AdapterNotFoundError: the directory or a file is missing.
        AdapterFormatError: not a plain LoRA config, weights that do not fit the model
            (unknown module, wrong shape, missing A or B), or NaN/inf weights (a corrupt or
            diverged adapter). The model is left unchanged.
    """
    directory = Path(directory)
    config_path, weights_path = find_files(directory)
    spec = parse_config(config_path)
    pairs = match_weights(model, read_weights(weights_path), spec, weights_path)
    check_finite(pairs, weights_path)
    existing = {a for _, layer in lora_layers(model) for a in layer.adapter_names}
    name = "default" if name is None else name
    if not name or "." in name:
        raise ValueError(f"adapter name must be non-empty and without '.', got {name!r}")
    if name in existing:
        raise ValueError(f"the model already has an adapter {name!r}; pass another name=")
    order = [n for n, _ in model.named_modules() if n in pairs]
    try:
        config = LoraConfig(
            r=spec.r,
            alpha=spec.alpha,
            dropout=spec.dropout,
            target_modules=order,
            use_rslora=spec.use_rslora,
            init=spec.init,
        )
    except ConfigError as err:
        raise AdapterFormatError(f"{config_path}: {err}") from None

    previous = {n: list(layer.active_adapters) for n, layer in lora_layers(model)}
    add_lora(model, config, adapter_name=name)
    for module, (weight_a, weight_b) in pairs.items():
        layer = model.get_submodule(module)
        r, alpha = spec.rank_alpha(module)
        if (r, alpha) != (spec.r, spec.alpha):  # rank_pattern / alpha_pattern
            layer.delete_adapter(name)
            layer.add_adapter(name, r, alpha, spec.dropout, spec.use_rslora, spec.init)
        with torch.no_grad():
            layer.lora_A[name].weight.copy_(weight_a)
            layer.lora_B[name].weight.copy_(weight_b)
    if trainable or not any(previous.values()):
        set_adapter(model, name)
    else:
        for module, layer in lora_layers(model):
            layer.set_adapter(previous.get(module, []))
    if not trainable:
        for _, layer in lora_layers(model):
            if name in layer.lora_A:
                layer.lora_A[name].weight.requires_grad_(False)
                layer.lora_B[name].weight.requires_grad_(False)
    return name
