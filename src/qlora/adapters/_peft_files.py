"""Reading and validating PEFT adapter files, before anything touches the model.

`load_adapter` (in `peft_format`) calls these in order: find the two files, parse the
config (rejecting anything that is not plain LoRA on Linear layers), read the weights
(decoding our int8 extension to float32, see `peft_format`'s docstring for the layout),
match every key to a Linear layer of the model with the shapes the config implies, and
check that every weight is finite.
"""

from __future__ import annotations

import json
import math
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from qlora.config import AdapterDtype
from qlora.models.safetensors_io import SafetensorsError, SafetensorsReader
from qlora.nn.inject import lora_layers
from qlora.nn.lora import LoRALinear
from qlora.nn.qlinear import QuantLinear

__all__ = [
    "ABSMAX_SUFFIX",
    "ADAPTER_DTYPES",
    "BLOCKSIZE_KEY",
    "CONFIG_NAME",
    "DTYPE_KEY",
    "INT8_BLOCKSIZE",
    "PREFIX",
    "SHAPES_KEY",
    "WEIGHTS_NAME",
    "AdapterFormatError",
    "AdapterNotFoundError",
    "Spec",
    "check_finite",
    "check_pairs",
    "decode_int8",
    "find_files",
    "match_weights",
    "parse_config",
    "read_weights",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
# The int8 extension (documented in `peft_format`): the marker in adapter_config.json and in
# the safetensors __metadata__, the scales' key suffix, the original shapes, the block size.
DTYPE_KEY = "qlora_adapter_dtype"
ABSMAX_SUFFIX = ".qlora_int8_absmax"
SHAPES_KEY = "qlora_int8_shapes"
BLOCKSIZE_KEY = "qlora_int8_blocksize"
INT8_BLOCKSIZE = 64
ADAPTER_DTYPES: tuple[str, ...] = typing.get_args(AdapterDtype)
_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$"
)
# DoRA's magnitude per output row: PEFT writes <module>.lora_magnitude_vector (no .weight)
MAGNITUDE = "lora_magnitude_vector"
_MAGNITUDE_KEY = re.compile(
    rf"^(?:base_model\.model\.)?(?P<module>.+)\.{MAGNITUDE}(?:\.[^.]+)?(?:\.weight)?$"
)

# Config keys that, when set, mean the file holds more than plain LoRA on Linear layers.
_UNSUPPORTED: dict[str, str] = {
    "lora_bias": "it trains a bias on lora_B",
    "fan_in_fan_out": "its weights are transposed for Conv1D layers",
    "modules_to_save": "it stores full copies of extra modules",
    "trainable_token_indices": "it trains embedding rows",
    "layer_replication": "it duplicates decoder layers",
    "target_parameters": "it adapts raw parameters, not Linear layers",
    "use_qalora": "QA-LoRA pools the adapter input",
    "alora_invocation_tokens": "activated LoRA depends on invocation tokens",
    "use_bdlora": "BD-LoRA uses block-diagonal factors",
    "arrow_config": "Arrow routes between several adapters",
    "megatron_config": "its layers are Megatron-parallel",
}
# init schemes that rewrite the base weights, so the adapter is relative to another base.
_BASE_CHANGING_INITS = ("olora", "corda", "loftq")


class AdapterFormatError(ValueError):
    """An adapter file is malformed or does not fit the model; the message names file and key."""


class AdapterNotFoundError(FileNotFoundError):
    """An adapter directory or one of its two files is missing."""


@dataclass(frozen=True)
class Spec:
    """What load needs from ``adapter_config.json``, validated."""

    r: int
    alpha: float
    dropout: float
    use_rslora: bool
    init: Literal["kaiming", "gaussian", "pissa"]
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    dtype: AdapterDtype = "float32"  # the config's qlora_adapter_dtype ("float32": none)
    use_dora: bool = False
    pissa_niter: int = 0  # init "pissa": 0 the exact SVD, n > 0 PEFT's "pissa_niter_n"

    def pattern_value(self, pattern: dict[str, Any], module: str, default: Any) -> Any:
        """PEFT's rule: the first key that regex-matches a dotted suffix of the module name."""
        for key, value in pattern.items():
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        return default

    def rank_alpha(self, module: str) -> tuple[int, float]:
        r = int(self.pattern_value(self.rank_pattern, module, self.r))
        return r, float(self.pattern_value(self.alpha_pattern, module, self.alpha))


def find_files(directory: Path) -> tuple[Path, Path]:
    """(config, weights) paths; the error hints at PEFT's multi-adapter subfolders and .bin."""
    if not directory.is_dir():
        raise AdapterNotFoundError(f"adapter directory {directory} does not exist")
    config, weights = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not config.is_file():
        subdirs = sorted(p.name for p in directory.iterdir() if (p / CONFIG_NAME).is_file())
        hint = (
            f"; it holds adapters in {', '.join(subdirs)}: pass {directory}/<name>"
            if subdirs
            else ""
        )
        raise AdapterNotFoundError(f"{config} is missing: not a PEFT adapter directory{hint}")
    if not weights.is_file():
        hint = (
            "; found adapter_model.bin (pickle), re-save it as safetensors"
            if (directory / "adapter_model.bin").is_file()
            else ""
        )
        raise AdapterNotFoundError(f"{weights} is missing{hint}")
    return config, weights


def parse_config(path: Path) -> Spec:
    """Validate ``adapter_config.json``: plain LoRA only, since anything else (DoRA, extra
    trainable modules, base-rewriting inits) would load silently wrong as plain LoRA."""

    def bad(message: str) -> AdapterFormatError:
        return AdapterFormatError(f"{path}: {message}")

    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise bad(f"not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise bad("expected a JSON object")
    if raw.get("peft_type") != "LORA":
        raise bad(f'peft_type is {raw.get("peft_type")!r}; only LoRA adapters ("LORA") load')
    for key, why in _UNSUPPORTED.items():
        if raw.get(key):
            raise bad(f"{key}={raw[key]!r} is not supported ({why}); use PEFT for this adapter")
    if raw.get("bias", "none") != "none":
        raise bad(f"bias={raw['bias']!r} is not supported (it trains base biases); only 'none'")
    init = raw.get("init_lora_weights", True)
    pissa_niter = 0
    if isinstance(init, str) and init.lower().startswith("pissa"):
        niter = init.lower().removeprefix("pissa").removeprefix("_niter_")
        if init.lower() != "pissa" and not niter.isdigit():
            raise bad(f'init_lora_weights={init!r}: expected "pissa" or "pissa_niter_<n>"')
        pissa_niter = int(niter) if init.lower() != "pissa" else 0
    elif isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise bad(
            f"init_lora_weights={init!r} changes the base weights; convert the adapter to "
            "plain LoRA with PEFT (path_initial_model_for_weight_conversion) first"
        )
    r, alpha, dropout = raw.get("r"), raw.get("lora_alpha", 8), raw.get("lora_dropout", 0.0)
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise bad(f"r must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float):
        raise bad(f"lora_alpha must be a number, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        raise bad(f"lora_dropout must be a number in [0, 1), got {dropout!r}")
    dtype = raw.get(DTYPE_KEY, "float32")
    if dtype not in ADAPTER_DTYPES:
        raise bad(
            f"{DTYPE_KEY}={dtype!r} is not a precision qlora writes; expected one of "
            f"{', '.join(ADAPTER_DTYPES)} (the file is from a newer qlora or was edited)"
        )
    patterns = {}
    for key in ("rank_pattern", "alpha_pattern"):
        value = raw.get(key) or {}
        if not isinstance(value, dict) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in value.values()
        ):
            raise bad(f"{key} must map module-name patterns to numbers, got {value!r}")
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as err:
                raise bad(f"{key} key {pattern!r} is not a valid regex ({err})") from None
        patterns[key] = value
    return Spec(
        r=r,
        alpha=float(alpha),
        dropout=float(dropout),
        use_rslora=bool(raw.get("use_rslora", False)),
        init="pissa"
        if isinstance(init, str) and init.lower().startswith("pissa")
        else "gaussian"
        if init == "gaussian"
        else "kaiming",
        rank_pattern=patterns["rank_pattern"],
        alpha_pattern=patterns["alpha_pattern"],
        dtype=dtype,
        use_dora=bool(raw.get("use_dora", False)),
        pissa_niter=pissa_niter,
    )


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the file (adapters are small), with our reader's file-naming errors.

    A file marked int8 in its ``__metadata__`` comes back decoded: float32 tensors of the
    original shapes under the plain PEFT keys (`decode_int8`).
    """
    try:
        with SafetensorsReader(path) as reader:
            tensors = {key: reader.get(key).clone() for key in reader.names()}
            metadata = dict(reader.metadata)
    except SafetensorsError as err:
        raise AdapterFormatError(str(err)) from None
    if metadata.get(DTYPE_KEY, "float32") == "int8":
        return decode_int8(tensors, metadata, path)
    for key in tensors:
        if key.endswith(ABSMAX_SUFFIX):
            raise AdapterFormatError(
                f"{path}: key {key!r} holds int8 scales but the file's __metadata__ lacks "
                f'"{DTYPE_KEY}": "int8"; the file is damaged (re-save the adapter)'
            )
    return tensors


def _int8_layout(metadata: dict[str, str], path: Path) -> tuple[int, dict[str, list[int]]]:
    """(blocksize, {key: [rows, cols]}) from an int8 file's ``__metadata__``, validated."""
    try:
        blocksize = int(metadata.get(BLOCKSIZE_KEY, ""))
        shapes = json.loads(metadata.get(SHAPES_KEY, ""))
    except (ValueError, json.JSONDecodeError):
        blocksize, shapes = 0, None
    if blocksize <= 0 or not isinstance(shapes, dict):
        raise AdapterFormatError(
            f"{path}: marked int8 but its __metadata__ lacks a valid {BLOCKSIZE_KEY!r} (a "
            f"positive integer) and {SHAPES_KEY!r} (JSON: key -> shape); the file is damaged"
        )
    for key, shape in shapes.items():
        dims = shape if isinstance(shape, list) and len(shape) == 2 else [0]
        if not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in dims):
            raise AdapterFormatError(f"{path}: {SHAPES_KEY} gives {key!r} the shape {shape!r}")
    return blocksize, shapes


def decode_int8(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path
) -> dict[str, torch.Tensor]:
    """Our int8 extension -> float32 tensors [rows, cols] under the plain PEFT keys.

    Each ``key`` holds int8 codes q [rows * cols] (row-major) in [-127, 127], and
    ``key + ABSMAX_SUFFIX`` the float32 absmax m [ceil(rows * cols / blocksize)] of each
    block; an element reads back as ``q / 127 * m`` (``qlora.quant``'s int8 codebook).
    """
    blocksize, shapes = _int8_layout(metadata, path)
    scales = {
        k.removesuffix(ABSMAX_SUFFIX): t for k, t in tensors.items() if k.endswith(ABSMAX_SUFFIX)
    }
    codes = {
        k: t
        for k, t in tensors.items()
        if not k.endswith(ABSMAX_SUFFIX) and not _MAGNITUDE_KEY.match(k)
    }
    for key in sorted(set(scales) - set(codes)):
        raise AdapterFormatError(f"{path}: {key}{ABSMAX_SUFFIX} has no codes tensor {key!r}")
    # DoRA magnitudes are stored float32 beside the codes
    decoded = {k: t for k, t in tensors.items() if _MAGNITUDE_KEY.match(k)}
    for key, code in codes.items():
        shape = shapes.get(key)
        if shape is None or key not in scales:
            missing = f"{SHAPES_KEY} entry" if shape is None else f"{key}{ABSMAX_SUFFIX}"
            raise AdapterFormatError(f"{path}: int8 tensor {key!r} has no {missing}")
        n, scale = math.prod(shape), scales[key]
        nblocks = -(-n // blocksize)
        if code.dtype != torch.int8 or tuple(code.shape) != (n,):
            raise AdapterFormatError(
                f"{path}: {key} should hold int8 codes [{n}] for shape {shape}, got "
                f"{code.dtype} {list(code.shape)}"
            )
        if scale.dtype != torch.float32 or tuple(scale.shape) != (nblocks,):
            raise AdapterFormatError(
                f"{path}: {key}{ABSMAX_SUFFIX} should hold float32 [{nblocks}], got "
                f"{scale.dtype} {list(scale.shape)}"
            )
        if not bool((torch.isfinite(scale) & (scale >= 0)).all()):
            raise AdapterFormatError(
                f"{path}: {key}{ABSMAX_SUFFIX} holds negative, NaN or inf scales; the file is "
                "damaged (re-save the adapter)"
            )
        values = code.float() / 127  # [n], the int8 codebook's (i - 128) / 127
        values = torch.nn.functional.pad(values, (0, nblocks * blocksize - n))
        decoded[key] = (values.view(nblocks, blocksize) * scale.view(-1, 1)).view(-1)[:n]
        decoded[key] = decoded[key].view(shape)
    return decoded


def split_magnitudes(
    tensors: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the A/B tensors, module name -> DoRA magnitude) of a weights file's tensors."""
    plain, magnitudes = {}, {}
    for key, tensor in tensors.items():
        match = _MAGNITUDE_KEY.match(key)
        if match is None:
            plain[key] = tensor
        else:
            magnitudes[match["module"]] = tensor
    return plain, magnitudes


def check_magnitudes(
    magnitudes: dict[str, torch.Tensor],
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]],
    spec: Spec,
    path: Path,
) -> dict[str, torch.Tensor]:
    """A DoRA file has one finite float magnitude [out] for each adapted layer; a plain
    one has none. Returns ``magnitudes`` checked."""
    if not spec.use_dora:
        if magnitudes:
            module = next(iter(magnitudes))
            raise AdapterFormatError(
                f"{path}: {PREFIX}{module}.{MAGNITUDE} is a DoRA magnitude, but "
                f"{CONFIG_NAME} has no use_dora: true; the two files do not belong together"
            )
        return {}
    for module in sorted(set(magnitudes) - set(pairs)):
        raise AdapterFormatError(f"{path}: {module}.{MAGNITUDE} has no lora_A / lora_B beside it")
    for module, (_, weight_b) in pairs.items():
        magnitude = magnitudes.get(module)
        key = f"{PREFIX}{module}.{MAGNITUDE}"
        if magnitude is None:
            raise AdapterFormatError(f"{path}: use_dora is true but {key} is missing")
        if not magnitude.is_floating_point() or tuple(magnitude.shape) != (weight_b.shape[0],):
            raise AdapterFormatError(
                f"{path}: {key} is {magnitude.dtype} {list(magnitude.shape)}; DoRA needs a "
                f"float vector of the layer's {weight_b.shape[0]} outputs"
            )
        if not bool(torch.isfinite(magnitude.float()).all()):
            raise AdapterFormatError(f"{path}: {key} holds NaN/inf values; the adapter is corrupt")
    return magnitudes


def match_weights(
    model: nn.Module, tensors: dict[str, torch.Tensor], spec: Spec, path: Path
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module name -> (A [r, in], B [out, r]), every key and shape checked against the model."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    wrapped = [n for n, _ in lora_layers(model)]
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise AdapterFormatError(
                f"{path}: key {key!r} is not a lora_A/lora_B weight of a Linear layer; "
                "only plain LoRA adapters load"
            )
        module, ab = match["module"], match["ab"]
        try:
            layer = model.get_submodule(module)
        except AttributeError:
            layer = None
        inside = any(module.startswith(p + ".") for p in wrapped)
        if inside or not isinstance(layer, nn.Linear | QuantLinear | LoRALinear):
            example = next((n for n, _ in lora_layers(model)), None) or next(
                (n for n, m in model.named_modules() if isinstance(m, nn.Linear | QuantLinear)), ""
            )
            raise AdapterFormatError(
                f"{path}: key {key!r} names {module!r}, which is no Linear layer of this model "
                f"(its layers are named like {example!r}); is the adapter for another model?"
            )
        if ab in found.setdefault(module, {}):
            raise AdapterFormatError(f"{path}: key {key!r} repeats the lora_{ab} of {module!r}")
        found[module][ab] = tensor
    if not found:
        raise AdapterFormatError(f"{path}: holds no LoRA weights")
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module, group in found.items():
        missing = [ab for ab in "AB" if ab not in group]
        if missing:
            raise AdapterFormatError(f"{path}: {module!r} has no lora_{missing[0]} weight")
        for ab in "AB":
            if not group[ab].is_floating_point():
                raise AdapterFormatError(
                    f"{path}: {module}.lora_{ab} is {group[ab].dtype}, not a float tensor, and "
                    f'the file\'s __metadata__ has no "{DTYPE_KEY}": "int8"; the file is damaged '
                    "or not a LoRA adapter"
                )
        layer = model.get_submodule(module)
        r, _ = spec.rank_alpha(module)
        for ab, want in (("A", (r, layer.in_features)), ("B", (layer.out_features, r))):
            got = tuple(group[ab].shape)
            if got == want:
                continue
            rank_axis = 0 if ab == "A" else 1
            key = f"{PREFIX}{module}.lora_{ab}.weight"
            if len(got) == 2 and got[1 - rank_axis] == want[1 - rank_axis]:
                raise AdapterFormatError(
                    f"{path}: {key} has rank {got[rank_axis]} (shape {list(got)}) but "
                    f"{CONFIG_NAME} gives r={r} for this layer; the two files do not belong "
                    "together (check r and rank_pattern)"
                )
            raise AdapterFormatError(
                f"{path}: {key} has shape {list(got)} but the model's layer has "
                f"{layer.in_features} inputs and {layer.out_features} outputs (needs "
                f"{list(want)}); the adapter was made for another base model"
            )
        pairs[module] = (group["A"], group["B"])
    return pairs


def check_finite(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], path: Path) -> None:
    """NaN or inf in A or B would make every output NaN: say so at load, naming the tensor."""
    for module, weights in pairs.items():
        for ab, weight in zip("AB", weights, strict=True):
            bad = int((~torch.isfinite(weight.float())).sum())
            if bad:
                raise AdapterFormatError(
                    f"{path}: {PREFIX}{module}.lora_{ab}.weight holds {bad} NaN/inf values; "
                    "the adapter is corrupt or its training diverged (retrain with a lower "
                    "learning rate, or load an earlier checkpoint)"
                )


def check_pairs(tensors: dict[str, torch.Tensor], spec: Spec, path: Path) -> None:
    """Without a model: every key a LoRA A or B, in pairs, 2-D, the config's rank, finite;
    DoRA magnitudes where the config says so."""
    tensors, magnitudes = split_magnitudes(tensors)
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise AdapterFormatError(f"{path}: key {key!r} is not a lora_A/lora_B weight")
        group = by_module.setdefault(match["module"], {})
        if match["ab"] in group:
            raise AdapterFormatError(f"{path}: key {key!r} repeats a weight of its layer")
        if not tensor.is_floating_point() or tensor.dim() != 2:
            raise AdapterFormatError(f"{path}: {key} is {tensor.dtype} {list(tensor.shape)}")
        group[match["ab"]] = tensor
    if not by_module:
        raise AdapterFormatError(f"{path}: holds no LoRA weights")
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module, group in by_module.items():
        if set(group) != {"A", "B"}:
            raise AdapterFormatError(f"{path}: {module!r} has only lora_{''.join(group)}")
        r, _ = spec.rank_alpha(module)
        if group["A"].shape[0] != r or group["B"].shape[1] != r:
            raise AdapterFormatError(
                f"{path}: {module!r} has A {list(group['A'].shape)} and B "
                f"{list(group['B'].shape)}, but {CONFIG_NAME} gives r={r}"
            )
        pairs[module] = (group["A"], group["B"])
    check_finite(pairs, path)
    check_magnitudes(magnitudes, pairs, spec, path)
