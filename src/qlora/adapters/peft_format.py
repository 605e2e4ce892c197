"""Adapter files in PEFT's layout, so adapters move freely between qlora and PEFT.

A directory holds two files:

* ``adapter_config.json``: PEFT 0.21's ``LoraConfig`` as PEFT itself writes it (every key,
  ``null`` for unused features, ``inference_mode: true``), with ``target_modules`` the
  shortest name suffixes that select exactly the adapted layers - leaf names such as
  ``"q_proj"`` when every layer of that name is adapted, longer dotted suffixes otherwise -
  and ``rank_pattern`` / ``alpha_pattern`` for layers whose rank or alpha differ from the
  most common one.
* ``adapter_model.safetensors``: ``base_model.model.<module>.lora_A.weight`` [r, in] and
  ``...lora_B.weight`` [out, r]; no adapter name in the key (PEFT strips it on save). A
  DoRA adapter (``"use_dora": true``) adds ``base_model.model.<module>.lora_magnitude_vector``
  [out] per layer, as PEFT writes it (no ``.weight``); with ``dtype="int8"`` it stays float32.

**Precision** (``dtype=``). ``"float32"`` (the default), ``"bfloat16"`` and ``"float16"``
write the tensors above in that dtype: plain PEFT files, which PEFT loads as they are.
``"int8"`` is our extension (blockwise absmax int8, as `qlora.quant`'s ``"int8"`` kind with
blocks of 64 and no double quantization; ~1.06 bytes per value instead of 4):

* ``<key>`` (the PEFT key above): int8 codes q [rows * cols], the weight flattened
  row-major, q in [-127, 127];
* ``<key>.qlora_int8_absmax``: float32 [ceil(rows * cols / 64)], the absolute maximum m of
  each block of 64 consecutive elements (the last block may be short);
* an element reads back as ``q / 127 * m``;
* the safetensors ``__metadata__`` holds ``"qlora_adapter_dtype": "int8"``,
  ``"qlora_int8_blocksize": "64"`` and ``"qlora_int8_shapes"`` (JSON: ``<key>`` ->
  ``[rows, cols]``), and ``adapter_config.json`` holds ``"qlora_adapter_dtype": "int8"``.

The codes are 1-D on purpose: PEFT (and anything else that loads ``<key>`` into a 2-D
LoRA weight) then fails with a size mismatch instead of silently casting codes to floats.
`load_adapter` reads all four precisions back into float32 LoRA weights;
`convert_adapter` re-saves an adapter directory at another precision without a model.

Saving replaces a previous adapter in the directory (its two files are ours to replace);
a directory holding anything else is refused unless ``overwrite=True`` (which keeps those
files), and one holding a full model is always refused.

Loading trusts the *weights* for which layers are adapted (a key names its module exactly)
and the config for ranks, alphas and dropout. Everything is validated (finite values too)
before the model is touched, so a bad file leaves the model as it was.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qlora.adapters._peft_files import (
    ABSMAX_SUFFIX,
    ADAPTER_DTYPES,
    BLOCKSIZE_KEY,
    CONFIG_NAME,
    DTYPE_KEY,
    INT8_BLOCKSIZE,
    MAGNITUDE,
    PREFIX,
    SHAPES_KEY,
    WEIGHTS_NAME,
    AdapterFormatError,
    AdapterNotFoundError,
    check_finite,
    check_magnitudes,
    check_pairs,
    find_files,
    match_weights,
    parse_config,
    read_weights,
    split_magnitudes,
)
from qlora.config import AdapterDtype, ConfigError, LoraConfig
from qlora.files import check_destination, refuse_source, staged_directory
from qlora.models.destination import refuse_model_directory
from qlora.models.safetensors_io import write_safetensors
from qlora.nn.inject import add_lora, lora_layers, set_adapter
from qlora.nn.lora import LoRALinear
from qlora.nn.pissa import init_pissa, pissa_to_lora
from qlora.quant import quantize

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "AdapterFormatError",
    "AdapterNotFoundError",
    "adapter_config",
    "convert_adapter",
    "encode_weights",
    "load_adapter",
    "read_adapter",
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
    model: nn.Module,
    adapter: str = "default",
    base_model_name_or_path: str | None = None,
    *,
    as_lora: bool = False,
) -> dict[str, Any]:
    """The ``adapter_config.json`` mapping `save_adapter` writes for ``adapter`` of ``model``
    (``as_lora``: for a PiSSA adapter converted to plain LoRA, rank and alpha doubled).

    Raises:
        ValueError: no layer of ``model`` has adapter ``adapter``.
    """
    layers = _layers_with(model, adapter)
    recorded = (getattr(model, "lora_configs", None) or {}).get(adapter)
    use_rslora = bool(recorded.use_rslora) if recorded is not None else False
    grow = 2 if as_lora else 1
    ranks = {name: grow * layer.lora_A[adapter].out_features for name, layer in layers}
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
        init_lora_weights=_init_name(recorded, as_lora),
        lora_alpha=alpha,
        lora_dropout=float(max(dropouts)),
        r=r,
        rank_pattern={n: v for n, v in ranks.items() if v != r},
        alpha_pattern={n: v for n, v in alphas.items() if v != alpha},
        target_modules=_minimal_suffixes([n for n, _ in layers], model),
        use_rslora=use_rslora,
        use_dora=any(adapter in layer.lora_magnitude_vector for _, layer in layers),
    )
    return config


def _init_name(recorded: LoraConfig | None, as_lora: bool) -> bool | str:
    """PEFT's init_lora_weights for the recorded config ("pissa..." keeps the file tied to
    the residual base; converted to LoRA it is plain again)."""
    if recorded is None or as_lora:
        return True
    if recorded.init == "gaussian":
        return "gaussian"
    if recorded.init == "pissa":
        return "pissa" if recorded.pissa_niter == 0 else f"pissa_niter_{recorded.pissa_niter}"
    return True


def _layers_with(model: nn.Module, adapter: str) -> list[tuple[str, LoRALinear]]:
    layers = [(n, layer) for n, layer in lora_layers(model) if adapter in layer.lora_A]
    if not layers:
        known = sorted({a for _, layer in lora_layers(model) for a in layer.adapter_names})
        raise ValueError(f"the model has no adapter {adapter!r}; it has {known or 'none'}")
    return layers


# -- precision ----------------------------------------------------------------------------------

_FLOAT16_MAX = 65504.0


def _check_dtype(dtype: str) -> None:
    if dtype not in ADAPTER_DTYPES:
        raise ValueError(
            f"unknown adapter dtype {dtype!r}; choose one of {', '.join(ADAPTER_DTYPES)}"
        )


def _int8_tensors(key: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """``key``: int8 codes [n]; ``key + ABSMAX_SUFFIX``: float32 scales [ceil(n / 64)]."""
    state = quantize(weight.float(), "int8", INT8_BLOCKSIZE, double_quant=False)
    # int8 codebook index i stands for (i - 128) / 127; |x / m| <= 1 never picks i = 0
    codes = (state.packed.view(-1).to(torch.int16) - 128).to(torch.int8)  # [n]
    return {key: codes, key + ABSMAX_SUFFIX: state.absmax.float().contiguous()}


def _float_tensors(tensors: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """Each weight cast to ``dtype``; float16's range checked first (beyond it: inf)."""
    if dtype == "float16":
        for key, weight in tensors.items():
            peak = float(weight.detach().abs().max()) if weight.numel() else 0.0
            if peak > _FLOAT16_MAX:
                raise ValueError(
                    f"{key} holds values up to {peak:.4g}, beyond float16's range (65504); "
                    "save it as bfloat16 or float32"
                )
    target = getattr(torch, dtype)
    return {k: t.detach().cpu().to(target).contiguous() for k, t in tensors.items()}


def encode_weights(
    tensors: dict[str, torch.Tensor], dtype: AdapterDtype
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """PEFT key -> weight [rows, cols] as stored at ``dtype``: (tensors, ``__metadata__``).

    Raises:
        ValueError: an unknown ``dtype``, a value beyond float16's range (|x| > 65504) for
            ``"float16"``, or NaN/inf (from `qlora.quant.quantize`) for ``"int8"``.
    """
    _check_dtype(dtype)
    metadata = {"format": "pt"}
    if dtype != "int8":
        return _float_tensors(tensors, dtype), metadata
    stored: dict[str, torch.Tensor] = {}
    shapes = {}
    for key, weight in tensors.items():
        if key.endswith(MAGNITUDE):  # DoRA's [out] magnitudes: float32 beside the codes
            stored[key] = weight.detach().cpu().float().contiguous()
            continue
        stored.update(_int8_tensors(key, weight.detach().cpu()))
        shapes[key] = list(weight.shape)
    metadata.update({
        DTYPE_KEY: "int8",
        BLOCKSIZE_KEY: str(INT8_BLOCKSIZE),
        SHAPES_KEY: json.dumps(shapes, sort_keys=True, separators=(",", ":")),
    })  # fmt: skip
    return dict(sorted(stored.items())), metadata


def _write(
    directory: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    config: dict[str, Any],
    dtype: AdapterDtype,
) -> None:
    """The two files, staged and published together (the config last)."""
    stored, metadata = encode_weights(dict(sorted(tensors.items())), dtype)
    config = {k: v for k, v in config.items() if k != DTYPE_KEY}
    if dtype == "int8":  # plain precisions stay plain PEFT configs
        config[DTYPE_KEY] = "int8"
    with staged_directory(directory, last=[CONFIG_NAME]) as staging:
        write_safetensors(staging / WEIGHTS_NAME, stored, metadata)
        text = json.dumps(config, indent=2, sort_keys=True) + "\n"
        (staging / CONFIG_NAME).write_text(text, encoding="utf-8")


def save_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    adapter: str = "default",
    base_model_name_or_path: str | None = None,
    *,
    overwrite: bool = False,
    dtype: AdapterDtype = "float32",
    pissa_initial: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
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
        dtype: precision of A and B in the file: "float32", "bfloat16", "float16" (plain
            PEFT files) or "int8" (our blockwise extension; see the module docstring).

    Returns:
        ``Path(directory)``.

    Raises:
        ValueError: the model has no adapter ``adapter``, an unknown ``dtype``, or values
            that ``dtype`` cannot hold (beyond float16's range; NaN/inf for int8).
        qlora.files.DestinationError: the destination is refused, as above.
    """
    _check_dtype(dtype)
    as_lora = pissa_initial is not None
    config = adapter_config(model, adapter, base_model_name_or_path, as_lora=as_lora)
    refuse_model_directory(directory, "an adapter")
    check_destination(directory, overwrite=overwrite, ours=(CONFIG_NAME, WEIGHTS_NAME))
    tensors: dict[str, torch.Tensor] = {}
    layers = _layers_with(model, adapter)
    pairs = {
        name: (layer.lora_A[adapter].weight.detach(), layer.lora_B[adapter].weight.detach())
        for name, layer in layers
    }
    if pissa_initial is not None:
        if any(adapter in layer.lora_magnitude_vector for _, layer in layers):
            raise ValueError("a DoRA + PiSSA adapter cannot be converted to plain LoRA")
        pairs = pissa_to_lora(pairs, pissa_initial)
    for name, layer in layers:
        for ab, weight in zip("AB", pairs[name], strict=True):
            tensors[f"{PREFIX}{name}.lora_{ab}.weight"] = weight.cpu()
        if adapter in layer.lora_magnitude_vector:  # DoRA, under PEFT's key
            magnitude = layer.lora_magnitude_vector[adapter]
            tensors[f"{PREFIX}{name}.{MAGNITUDE}"] = magnitude.detach().cpu()
    _write(directory, tensors, config, dtype)
    return Path(directory)


def convert_adapter(
    source: str | os.PathLike,
    directory: str | os.PathLike,
    dtype: AdapterDtype,
    *,
    overwrite: bool = False,
) -> Path:
    """Re-save the adapter in ``source`` at precision ``dtype`` in ``directory``; no model needed.

    The config is kept as it is (every key; only the int8 marker changes) and the weights are
    read at their stored precision (int8 decoded to float32) and written at ``dtype``, so
    converting up (int8 -> float32) is exact but does not restore what int8 rounded away.

    Args:
        source: an adapter directory (`save_adapter`'s or PEFT's), any of the four precisions.
        directory: the destination, a new or empty directory; never ``source``.
        dtype: "float32", "bfloat16", "float16" or "int8" (see the module docstring).
        overwrite: write into a non-empty directory, replacing only the two adapter files.

    Returns:
        ``Path(directory)``.

    Raises:
        AdapterNotFoundError, AdapterFormatError: ``source`` is missing or malformed (nothing
            is written).
        ValueError: an unknown ``dtype`` or values ``dtype`` cannot hold.
        qlora.files.DestinationError: ``directory`` is ``source``, holds a model, or is not
            empty and not ``overwrite``.
    """
    _check_dtype(dtype)
    source = Path(source)
    config_path, weights_path = find_files(source)
    spec = parse_config(config_path)
    tensors = read_weights(weights_path)
    check_pairs(tensors, spec, weights_path)
    refuse_source(directory, [source], "the adapter")
    refuse_model_directory(directory, "an adapter")
    check_destination(directory, overwrite=overwrite)
    config = json.loads(config_path.read_text(encoding="utf-8"))
    _write(directory, {k: t.float() for k, t in tensors.items()}, config, dtype)
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
    tensors, magnitudes = split_magnitudes(read_weights(weights_path))
    pairs = match_weights(model, tensors, spec, weights_path)
    check_finite(pairs, weights_path)
    magnitudes = check_magnitudes(magnitudes, pairs, spec, weights_path)
    existing = {a for _, layer in lora_layers(model) for a in layer.adapter_names}
    if spec.init == "pissa" and existing:
        raise AdapterFormatError(
            f"{config_path}: a PiSSA adapter (init_lora_weights "
            f"{'pissa' if not spec.pissa_niter else f'pissa_niter_{spec.pissa_niter}'}) "
            "replaces the base weights by their residual; load it into a model without other "
            "adapters, or convert it to plain LoRA first"
        )
    quantized = [m for m in pairs if not isinstance(model.get_submodule(m), nn.Linear)]
    if spec.init == "pissa" and quantized:
        kind = type(model.get_submodule(quantized[0])).__name__
        raise AdapterFormatError(
            f"{config_path}: a PiSSA adapter is applied by splitting the full-precision "
            f"weights again, but {quantized[0]} is a {kind}; load the base with quant=None, "
            "or convert the adapter to plain LoRA"
        )
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
            pissa_niter=spec.pissa_niter,
            use_dora=spec.use_dora,
        )
    except ConfigError as err:
        raise AdapterFormatError(f"{config_path}: {err}") from None

    previous = {n: list(layer.active_adapters) for n, layer in lora_layers(model)}
    add_lora(model, config, adapter_name=name)
    for module in pairs:
        layer = model.get_submodule(module)
        r, alpha = spec.rank_alpha(module)
        if (r, alpha) != (spec.r, spec.alpha):  # rank_pattern / alpha_pattern
            layer.delete_adapter(name)
            init = "kaiming" if spec.init == "pissa" else spec.init
            layer.add_adapter(
                name, r, alpha, spec.dropout, spec.use_rslora, init, use_dora=spec.use_dora
            )
    if spec.init == "pissa":  # as PEFT: the split again, then the trained factors
        init_pissa(model, config, None, adapter_name=name, progress=False)
    for module, (weight_a, weight_b) in pairs.items():
        layer = model.get_submodule(module)
        with torch.no_grad():
            layer.lora_A[name].weight.copy_(weight_a)
            layer.lora_B[name].weight.copy_(weight_b)
            if module in magnitudes:
                layer.lora_magnitude_vector[name].copy_(magnitudes[module])
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
            if name in layer.lora_magnitude_vector:
                layer.lora_magnitude_vector[name].requires_grad_(False)
    return name


def read_adapter(
    model: nn.Module, directory: str | os.PathLike
) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """The PEFT adapter at ``directory`` as plain tensors fitted to ``model``, which is not
    changed: module path -> (A [r, in], B [out, r], scaling), float32 on the model's device.

    What a server needs to hot-load an adapter next to running requests: every check of
    `load_adapter` (files, config, keys, shapes, finite values), none of its surgery.

    Raises:
        AdapterNotFoundError, AdapterFormatError: as `load_adapter`.
    """
    directory = Path(directory)
    config_path, weights_path = find_files(directory)
    spec = parse_config(config_path)
    if spec.init == "pissa":
        raise AdapterFormatError(
            f"{config_path}: a PiSSA adapter replaces the base weights by their residual; "
            "serve it converted to plain LoRA (rank 2r over the original weights), or merged"
        )
    if spec.use_dora:
        raise AdapterFormatError(
            f"{config_path}: a DoRA adapter (use_dora: true); it is applied by qlora's model "
            "(load_adapter) or merged into the base (qlora merge / export), not served "
            "unmerged next to plain LoRA adapters"
        )
    pairs = match_weights(model, read_weights(weights_path), spec, weights_path)
    check_finite(pairs, weights_path)
    weights: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for module, (weight_a, weight_b) in pairs.items():
        layer = model.get_submodule(module)
        device = next(itertools.chain(layer.parameters(), layer.buffers())).device
        r, alpha = spec.rank_alpha(module)
        scaling = float(alpha) / (math.sqrt(r) if spec.use_rslora else r)
        weights[module] = (
            weight_a.to(device=device, dtype=torch.float32).contiguous(),
            weight_b.to(device=device, dtype=torch.float32).contiguous(),
            scaling,
        )
    return weights
