"""`load_model`: any decoder-only checkpoint, quantized while it streams in.

The full-precision model is never materialized:

1. The architecture is built from ``config.json`` on the meta device (shapes, no memory).
2. Tensors are read one at a time from the safetensors files through a memory map. A target
   Linear weight (``target_modules``, default every Linear but the output head) is quantized
   as it arrives and only its codes and scales are kept; every other tensor (embeddings,
   norms, output head, biases) is copied in ``dtype``. The consumed file pages are then
   dropped from the process (see `safetensors_io`), so the peak resident memory is the
   quantized model plus one tensor in flight, whatever the checkpoint's size.
3. Target Linear layers are replaced by `QuantLinear`; tied parameters (e.g. the output head
   sharing the embedding) stay tied; non-persistent buffers that cannot come from the
   checkpoint (rotary ``inv_freq``) are recomputed by building their module again.

Checkpoints saved pre-quantized by bitsandbytes (``Linear4bit`` keys: ``weight``,
``weight.absmax``, ``weight.quant_map``, ``weight.nested_*``, ``weight.quant_state.*``) load
into `QuantLinear` without re-quantizing, byte for byte.
"""

from __future__ import annotations

import ctypes
import json
import os
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from qlora.config import TargetModules
from qlora.models.registry import ModelLoadError, gguf_to_hf, registered_path
from qlora.models.safetensors_io import SafetensorsError, SafetensorsReader
from qlora.nn.inject import _replace, find_targets
from qlora.nn.qlinear import QuantLinear
from qlora.quant.blockwise import quantize
from qlora.quant.dequant import dequantize
from qlora.quant.state import QuantState

__all__ = ["LoadInfo", "load_model", "resolve_checkpoint"]

QuantKind = Literal["nf4", "fp4", "int8", "nf2"]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass
class LoadInfo:
    """What `load_model` did; stored as ``model.qlora_load_info``."""

    source: str
    directory: Path
    quant: str | None
    prequantized: bool
    seconds: float = 0.0
    quantized_layers: int = 0
    quantized_params: int = 0
    quantized_bytes: int = 0
    full_precision_bytes: int = 0
    shards: list[Path] = field(default_factory=list)

    @property
    def bits_per_quantized_param(self) -> float:
        return 8 * self.quantized_bytes / max(self.quantized_params, 1)


def _as_dtype(value: torch.dtype | str | None, default: torch.dtype) -> torch.dtype:
    if value is None:
        return default
    if isinstance(value, torch.dtype):
        return value
    if value not in _DTYPES:
        raise ValueError(f"unknown dtype {value!r}; choose one of {', '.join(_DTYPES)}")
    return _DTYPES[value]


def resolve_checkpoint(source: str | os.PathLike) -> Path:
    """A Hugging Face directory for ``source``: a directory, a ``.gguf`` file or a name."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{path} is not a Hugging Face model directory: it has no config.json"
            )
        return path
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return gguf_to_hf(path)
        if path.name == "config.json" or path.suffix == ".safetensors":
            return resolve_checkpoint(path.parent)
        raise ModelLoadError(
            f"{path}: expected a model directory, a .gguf file or a registered model name"
        )
    registered = registered_path(str(source))
    if registered is not None:
        return gguf_to_hf(registered) if registered.suffix == ".gguf" else registered
    from qlora.models.registry import REGISTRY

    raise ModelLoadError(
        f"{source!r} is not a directory, a file or a registered model name "
        f"({', '.join(REGISTRY)}); models are never downloaded - pass a local directory"
    )


def _shards(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint, checking that an index's shards all exist."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as err:
            raise ModelLoadError(f"{index}: not a valid safetensors index ({err})") from None
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (directory / n).is_file()]
        if missing:
            raise ModelLoadError(
                f"{directory}: shard(s) {', '.join(missing)} listed in {index.name} are missing "
                "(an incomplete download?); fetch them again"
            )
        return [directory / n for n in names]
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(directory.glob("*.safetensors"))
    if found:
        return found
    legacy = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt")]
    hint = (
        f" (found {', '.join(legacy)}: re-save it with transformers' "
        "save_pretrained(dir, safe_serialization=True))"
        if legacy
        else ""
    )
    raise ModelLoadError(f"{directory}: no model.safetensors or shard index{hint}")


def _load_config(directory: Path) -> Any:
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        raw = json.loads((directory / "config.json").read_text())
    except ValueError as err:
        raise ModelLoadError(f"{directory / 'config.json'}: not valid JSON ({err})") from None
    model_type = raw.get("model_type")
    try:
        config = AutoConfig.from_pretrained(directory)
    except (ValueError, KeyError) as err:
        import transformers

        raise ModelLoadError(
            f"{directory / 'config.json'}: unknown architecture model_type={model_type!r} "
            f"(transformers {transformers.__version__} does not know it; upgrade transformers "
            f"or check the file): {str(err).splitlines()[0]}"
        ) from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelLoadError(
            f"{directory}: model_type={config.model_type!r} is not a decoder-only causal LM "
            "architecture (no AutoModelForCausalLM class); qlora fine-tunes causal LMs"
        )
    return config


def _prequantized(config: Any) -> dict[str, Any] | None:
    """The bitsandbytes 4-bit ``quantization_config`` of a pre-quantized checkpoint, if any."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    method = qc.get("quant_method")
    if method == "qlora" or (method == "bitsandbytes" and qc.get("load_in_4bit", True)):
        return qc
    raise ModelLoadError(
        f"unsupported quantization_config {qc.get('quant_method')!r} "
        f"(load_in_8bit={qc.get('load_in_8bit')}); qlora loads full-precision checkpoints and "
        "bitsandbytes 4-bit ones"
    )


def _rebuild_meta_buffers(model: nn.Module, device: torch.device) -> None:
    """Recompute non-persistent buffers left on the meta device (e.g. rotary ``inv_freq``).

    They are derived from the config, never saved. Their module is built again for real
    (these modules have no parameters, so this is cheap) and swapped in.
    """
    for name, module in list(model.named_modules()):
        meta = [b for b in module._non_persistent_buffers_set if _is_meta(module._buffers[b])]
        if not meta:
            continue
        if any(True for _ in module.parameters(recurse=False)) or not hasattr(module, "config"):
            raise ModelLoadError(
                f"cannot initialize buffer(s) {meta} of {name} ({type(module).__name__}): "
                "they are not in the checkpoint and the module cannot be rebuilt from its config"
            )
        with torch.device(device):
            fresh = type(module)(config=module.config)
        _replace(model, name, fresh)


def _is_meta(tensor: torch.Tensor | None) -> bool:
    return tensor is not None and tensor.device.type == "meta"


def check_shape(name: str, expected: torch.Size, got: torch.Size) -> None:
    """`ModelLoadError` when a checkpoint tensor does not fit the architecture."""
    if tuple(expected) != tuple(got):
        raise ModelLoadError(
            f"tensor {name!r} has shape {list(got)} in the checkpoint but the architecture "
            f"from config.json expects {list(expected)}; config and weights do not match"
        )


class _Slots:
    """Where each checkpoint key goes: the model's parameters and persistent buffers.

    Tied parameters (one Parameter reachable under several names) are assigned together so
    that they stay one tensor.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.places: dict[str, list[tuple[nn.Module, str]]] = {}
        by_id: dict[int, list[tuple[nn.Module, str]]] = defaultdict(list)
        names_by_id: dict[int, list[str]] = defaultdict(list)
        for mod_name, module in model.named_modules(remove_duplicate=False):
            for pname, param in module._parameters.items():
                if param is not None:
                    full = f"{mod_name}.{pname}" if mod_name else pname
                    by_id[id(param)].append((module, pname))
                    names_by_id[id(param)].append(full)
            for bname, buf in module._buffers.items():
                if buf is not None and bname not in module._non_persistent_buffers_set:
                    full = f"{mod_name}.{bname}" if mod_name else bname
                    self.places[full] = [(module, bname)]
        for key, names in names_by_id.items():
            for full in names:
                self.places[full] = by_id[key]
        self.filled: set[int] = set()
        self.prefix = getattr(model, "base_model_prefix", "") or ""

    def resolve(self, key: str) -> str | None:
        """The model's name for checkpoint key ``key`` (adding/removing the base prefix)."""
        if key in self.places:
            return key
        if self.prefix:
            if f"{self.prefix}.{key}" in self.places:
                return f"{self.prefix}.{key}"
            if key.startswith(self.prefix + ".") and key[len(self.prefix) + 1 :] in self.places:
                return key[len(self.prefix) + 1 :]
        return None

    def assign(self, name: str, tensor: torch.Tensor) -> None:
        places = self.places[name]
        module, attr = places[0]
        old = getattr(module, attr)
        check_shape(name, old.shape, tensor.shape)
        if isinstance(old, nn.Parameter):
            value: torch.Tensor = nn.Parameter(tensor, requires_grad=old.requires_grad)
        else:
            value = tensor
        for module, attr in places:
            if attr in module._parameters:
                module._parameters[attr] = value  # type: ignore[assignment]
            else:
                module._buffers[attr] = value
        self.filled.add(id(places[0]))

    def missing(self) -> list[str]:
        return [n for n, places in self.places.items() if _is_meta(getattr(*places[0]))]


def _trim_heap() -> None:
    """Return freed heap memory to the OS (glibc's ``malloc_trim``; a no-op elsewhere).

    Loading frees many short-lived buffers between long-lived ones; glibc keeps such holes
    mapped, so the resident set would stay above what the model holds.
    """
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def load_model(
    source: str | os.PathLike = "smollm2-135m",
    quant: QuantKind | None = "nf4",
    *,
    double_quant: bool = True,
    blocksize: int = 64,
    compute_dtype: torch.dtype | str | None = None,
    dtype: torch.dtype | str | None = None,
    target_modules: TargetModules = "all-linear",
    device: str | torch.device = "cpu",
    tokenizer: bool = True,
    progress: bool = True,
) -> tuple[nn.Module, Any]:
    """Load a causal LM, quantizing its Linear layers while the tensors stream in.

    Args:
        source: a Hugging Face directory (``model.safetensors`` or a sharded index), a
            directory saved pre-quantized by bitsandbytes, a ``.gguf`` file, or a registered
            name (default ``smollm2-135m``).
        quant: ``"nf4"``, ``"fp4"``, ``"int8"``, ``"nf2"`` or None (full precision).
        double_quant: quantize the block scales too (QLoRA's double quantization).
        blocksize: elements per quantization block.
        compute_dtype: dtype the quantized weights are dequantized to for matmuls
            (default: ``dtype``).
        dtype: dtype of everything kept in full precision - embeddings, norms, the output
            head, and the Linear weights when ``quant`` is None. Default float32 on CPU
            (no fast bf16 there) and bfloat16 on CUDA.
        target_modules: Linear layers to quantize ("all-linear": all but the output head).
        device: where the model is built; tensors go there as they are read.
        tokenizer: also load the tokenizer (returns None in its place when False).
        progress: show a progress bar.

    Returns:
        ``(model, tokenizer)``; the model is in eval mode with ``model.qlora_load_info``.

    Raises:
        ModelLoadError: a missing file or shard, a corrupt or truncated safetensors file, an
            unknown architecture, or weights that do not fit the config; the message names
            the file or tensor.
    """
    start = time.perf_counter()
    device = torch.device(device)
    dtype = _as_dtype(dtype, torch.float32 if device.type == "cpu" else torch.bfloat16)
    compute = _as_dtype(compute_dtype, dtype)
    directory = resolve_checkpoint(source)
    config = _load_config(directory)
    shards = _shards(directory)
    stored = _prequantized(config)
    if stored is not None:
        delattr(config, "quantization_config")  # we quantize; transformers must not
        stored_kind = stored.get("bnb_4bit_quant_type", "nf4")
        if quant is not None and quant != stored_kind:
            warnings.warn(
                f"{directory} is pre-quantized as {stored_kind}; using that instead of "
                f"quant={quant!r} (pass quant=None to dequantize it to {dtype})",
                stacklevel=2,
            )
            quant = stored_kind
    info = LoadInfo(str(source), directory, quant, stored is not None, shards=shards)

    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    targets = set(find_targets(model, target_modules)) if quant or stored else set()
    slots = _Slots(model)
    pending: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)  # pre-quantized groups
    states: dict[str, QuantState] = {}
    unexpected: list[str] = []

    readers = []
    try:
        for shard in shards:
            try:
                readers.append(SafetensorsReader(shard))
            except SafetensorsError as err:
                raise ModelLoadError(str(err)) from None
        total = sum(len(r.tensors) for r in readers)
        label = f"load {directory.name} [{quant or str(dtype).removeprefix('torch.')}]"
        bar = tqdm(total=total, desc=label, unit="tensor", disable=not progress)
        for reader in readers:
            for key in reader.names():
                module_name, _, leaf = key.partition(".weight.")
                if leaf:  # bitsandbytes' quantization extras: weight.absmax, weight.quant_map..
                    name = slots.resolve(module_name + ".weight")
                    if name is None:
                        unexpected.append(key)
                    else:
                        pending[name.removesuffix(".weight")][key] = reader.get(key).clone()
                    bar.update()
                    continue
                name = slots.resolve(key)
                if name is None:
                    unexpected.append(key)
                    bar.update()
                    continue
                view = reader.get(key)
                owner = name.rpartition(".")[0]
                if name.endswith(".weight") and owner in targets and view.dtype == torch.uint8:
                    pending[owner][key] = view.clone()  # a bitsandbytes packed weight
                elif name.endswith(".weight") and owner in targets and quant and stored is None:
                    check_shape(name, model.get_submodule(owner).weight.shape, view.shape)
                    states[owner] = quantize(view.to(device), quant, blocksize, double_quant)
                    info.quantized_params += view.numel()
                else:
                    target = dtype if view.is_floating_point() else view.dtype
                    slots.assign(name, view.to(device=device, dtype=target, copy=True))
                    info.full_precision_bytes += view.numel() * target.itemsize
                del view
                reader.release(key)
                bar.update()
                if bar.n % 16 == 0:
                    _trim_heap()
                    bar.set_postfix(rss=f"{_rss_mb():.0f}MB", refresh=False)
        bar.set_postfix(rss=f"{_rss_mb():.0f}MB")
        bar.close()
    finally:
        for reader in readers:
            reader.close()

    for owner, group in pending.items():
        weight_key = next(k for k in group if k.endswith(".weight"))
        try:
            state = QuantState.from_state_dict(group, weight_key, where=f"{directory}: {owner}")
        except (KeyError, ValueError) as err:
            raise ModelLoadError(str(err).strip("'\"")) from None
        check_shape(weight_key, model.get_submodule(owner).weight.shape, state.shape)
        states[owner] = state.to(device)
        info.quantized_params += state.numel

    for owner, state in states.items():
        linear = model.get_submodule(owner)
        bias = linear.bias if isinstance(linear, nn.Linear) else None
        if bias is not None and _is_meta(bias):
            raise ModelLoadError(f"{directory}: the checkpoint has no tensor {owner}.bias")
        if quant is None:  # a pre-quantized checkpoint asked for in full precision
            replacement = nn.Linear(
                state.shape[1], state.shape[0], bias=bias is not None, device=device, dtype=dtype
            )
            with torch.no_grad():
                replacement.weight.copy_(dequantize(state, dtype=dtype))
                if bias is not None:
                    replacement.bias.copy_(bias)
        else:
            replacement = QuantLinear(state, bias, compute_dtype=compute)
            info.quantized_layers += 1
            info.quantized_bytes += state.storage_bytes()
        _replace(model, owner, replacement)
        for key in (f"{owner}.weight", f"{owner}.bias"):
            slots.places.pop(key, None)

    missing = slots.missing()
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise ModelLoadError(
            f"{directory}: the checkpoint lacks {len(missing)} tensor(s) the architecture "
            f"needs: {shown}; is it complete, and does config.json belong to it?"
        )
    if unexpected:
        shown = ", ".join(unexpected[:5]) + (" ..." if len(unexpected) > 5 else "")
        warnings.warn(
            f"{directory}: ignored {len(unexpected)} tensor(s) the architecture does not use: "
            f"{shown}",
            stacklevel=2,
        )
    _rebuild_meta_buffers(model, device)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if _is_meta(t)]
    if leftover:
        raise ModelLoadError(f"{directory}: tensors left uninitialized: {', '.join(leftover)}")

    model.eval()
    _trim_heap()
    _attach_generation_config(model, directory)
    info.seconds = time.perf_counter() - start
    model.qlora_load_info = info
    return model, (_load_tokenizer(directory) if tokenizer else None)


def _attach_generation_config(model: nn.Module, directory: Path) -> None:
    if not (directory / "generation_config.json").is_file():
        return
    from transformers import GenerationConfig

    try:
        model.generation_config = GenerationConfig.from_pretrained(directory)
    except (OSError, ValueError) as err:
        warnings.warn(f"{directory}: generation_config.json ignored ({err})", stacklevel=3)


def _load_tokenizer(directory: Path) -> Any:
    if not any((directory / name).is_file() for name in _TOKENIZER_FILES):
        raise ModelLoadError(
            f"{directory}: no tokenizer files ({', '.join(_TOKENIZER_FILES)}); copy them in, "
            "or pass tokenizer=False"
        )
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{directory}: cannot load the tokenizer: {err}") from None
