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

In code, `load_model` runs named stages: `_plan` (arguments and config dataclasses -> one
resolved `_Plan`), `resolve_checkpoint` / `_load_config` / `_shards` (files),
`_reconcile_prequantized`, `_skeleton` (meta model), `_Stream.read` (step 2),
`_install_quantized` (step 3) and `_check_complete`.

Checkpoints saved pre-quantized by bitsandbytes (``Linear4bit`` keys: ``weight``,
``weight.absmax``, ``weight.quant_map``, ``weight.nested_*``, ``weight.quant_state.*``) load
into `QuantLinear` without re-quantizing, byte for byte. A ``.gguf`` loaded with
``quant="gguf"`` keeps its own blocks (Q4_0, Q4_1, Q8_0, K-quants) the same way
(`qlora.models.gguf_source`): the tensors stream from the converted directory as usual, but a
target's weight is taken from the file's bytes instead of being quantized.

Safety: a model folder's own Python (``auto_map`` in ``config.json``) never runs unless the
caller passes ``trust_remote_code=True`` on purpose; transformers is always told so
explicitly, because left to itself it asks on stdin, and a piped "y" would run the code.
Every floating-point tensor is checked for NaN/inf as it streams in: quantizing NaN gives
garbage block scales, and the failure would only show much later as a diverging loss.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import math
import os
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from qlora.config import ModelConfig, QuantConfig, TargetModules
from qlora.devices import DeviceError, resolve_device
from qlora.dtypes import torch_dtype
from qlora.hardware import choose_compute_dtype
from qlora.models.gguf_source import GGUFBase, gguf_file
from qlora.models.registry import DEFAULT_MODEL, ModelLoadError, gguf_to_hf, registered_path
from qlora.models.safetensors_io import SafetensorsError, SafetensorsReader
from qlora.nn.cast_linear import CastLinear
from qlora.nn.inject import find_targets, replace_module
from qlora.nn.qlinear import QuantLinear
from qlora.nn.rms_norm import fuse_norms
from qlora.nn.swiglu import fuse_mlps
from qlora.procinfo import rss_bytes
from qlora.quant.blockwise import quantize
from qlora.quant.codebooks import BaseKind
from qlora.quant.dequant import dequantize
from qlora.quant.state import QuantState

__all__ = ["BlockSink", "LoadInfo", "WeightSplit", "load_model", "resolve_checkpoint"]

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
    gguf_blocks: str = ""  # quant="gguf": which of the file's block kinds were kept

    @property
    def bits_per_quantized_param(self) -> float:
        return 8 * self.quantized_bytes / max(self.quantized_params, 1)


def _as_dtype(value: torch.dtype | str | None, default: torch.dtype) -> torch.dtype:
    if value is None:
        return default
    if isinstance(value, torch.dtype):
        return value
    return torch_dtype(value)


def _compute_dtype(
    value: torch.dtype | str | None, dtype: torch.dtype, device: torch.device
) -> torch.dtype:
    """The k-bit base's matmul dtype: ``"auto"`` asks the hardware (`qlora.hardware`); None
    (a plain keyword call) keeps the model's ``dtype``."""
    if value == "auto":
        return choose_compute_dtype(device).dtype
    return _as_dtype(value, dtype)


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


def _custom_code_error(directory: Path, filename: str, auto_map: dict[str, Any]) -> ModelLoadError:
    modules = sorted(
        {str(ref).split("--")[-1].rsplit(".", 1)[0] + ".py" for ref in auto_map.values()}
    )
    return ModelLoadError(
        f"{directory}: {filename} maps {', '.join(sorted(auto_map))} to the model's own Python "
        f"code ({', '.join(modules)}): it needs custom code, which qlora does not run; pass "
        "trust_remote_code=True (model.trust_remote_code: true) only after reading that code"
    )


def _auto_map(path: Path) -> dict[str, Any]:
    """The ``auto_map`` of a JSON file (a model's pointer to its own code), {} when none."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    auto_map = raw.get("auto_map") if isinstance(raw, dict) else None
    return auto_map if isinstance(auto_map, dict) else {}


def _load_config(directory: Path, trust_remote_code: bool = False) -> Any:
    """The architecture config; refuses custom code unless ``trust_remote_code``."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        raw = json.loads((directory / "config.json").read_text())
    except ValueError as err:
        raise ModelLoadError(f"{directory / 'config.json'}: not valid JSON ({err})") from None
    auto_map = _auto_map(directory / "config.json")
    if auto_map and not trust_remote_code:
        raise _custom_code_error(directory, "config.json", auto_map)
    model_type = raw.get("model_type")
    try:
        config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError) as err:
        import transformers

        raise ModelLoadError(
            f"{directory / 'config.json'}: unknown architecture model_type={model_type!r} "
            f"(transformers {transformers.__version__} does not know it; upgrade transformers "
            f"or check the file): {str(err).splitlines()[0]}"
        ) from None
    custom_causal_lm = trust_remote_code and "AutoModelForCausalLM" in auto_map
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not custom_causal_lm:
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
        meta = [b for b in module._non_persistent_buffers_set if _is_meta(module._buffers.get(b))]
        if not meta:
            continue
        if any(True for _ in module.parameters(recurse=False)) or not hasattr(module, "config"):
            raise ModelLoadError(
                f"cannot initialize buffer(s) {meta} of {name} ({type(module).__name__}): "
                "they are not in the checkpoint and the module cannot be rebuilt from its config"
            )
        with torch.device(device):
            fresh = type(module)(config=module.config)
        replace_module(model, name, fresh)


def _is_meta(tensor: torch.Tensor | None) -> bool:
    return tensor is not None and tensor.device.type == "meta"


def check_shape(name: str, expected: torch.Size, got: torch.Size) -> None:
    """`ModelLoadError` when a checkpoint tensor does not fit the architecture."""
    if tuple(expected) != tuple(got):
        raise ModelLoadError(
            f"tensor {name!r} has shape {list(got)} in the checkpoint but the architecture "
            f"from config.json expects {list(expected)}; config and weights do not match"
        )


def check_finite(tensor: torch.Tensor, name: str, where: Path | str) -> None:
    """`ModelLoadError` naming ``name`` and its file when ``tensor`` holds NaN or inf.

    One summing pass decides: a NaN or inf anywhere makes the sum non-finite. It allocates
    nothing and is ~10x faster on CPU than ``torch.isfinite(t).all()`` (which writes a bool
    mask). Only a non-finite sum - a bad tensor, or finite values whose sum overflowed - is
    looked at element by element.
    """
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return
    flat = tensor.reshape(-1)  # [numel], a view for the contiguous tensors read from a file
    if flat.dtype.itemsize == 1:  # float8: no sum kernel everywhere; rare and small
        flat = flat.float()
    total = flat.sum(dtype=torch.float32) if flat.dtype.itemsize < 4 else flat.sum()
    if math.isfinite(float(total)):
        return
    nan = int(torch.isnan(flat).sum())
    inf = int(torch.isinf(flat).sum())
    if nan == inf == 0:
        return  # the sum overflowed; every value is finite
    raise ModelLoadError(
        f"{where}: tensor {name!r} holds {nan} NaN and {inf} inf value(s) of "
        f"{flat.numel()}; the checkpoint is corrupt (a diverged run or a broken conversion?): "
        "re-download or re-export it"
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
        return rss_bytes() / 2**20
    except OSError:
        return float("nan")


@dataclass(frozen=True)
class _Plan:
    """What `load_model` was asked for, every default resolved (the stages read only this)."""

    source: str
    quant: str | None
    double_quant: bool
    blocksize: int
    compute_dtype: torch.dtype
    dtype: torch.dtype
    target_modules: TargetModules
    device: torch.device
    trust_remote_code: bool


# load_model's defaults for what neither a keyword nor a config dataclass sets. A plain
# source keeps device "cpu" (ModelConfig's own default is "auto").
_DEFAULTS: dict[str, Any] = {
    "double_quant": True,
    "blocksize": 64,
    "compute_dtype": None,  # -> dtype
    "dtype": None,  # -> float32 on CPU, bfloat16 on CUDA
    "target_modules": "all-linear",
    "device": "cpu",
    "trust_remote_code": False,
}


def _config_fields(
    source: str | os.PathLike | ModelConfig, quant: str | QuantConfig | None
) -> dict[str, Any]:
    """The settings the config dataclasses carry (None where a plain argument says nothing)."""
    fields: dict[str, Any] = dict.fromkeys(_DEFAULTS)
    if isinstance(source, ModelConfig):
        fields["device"] = source.device
        fields["dtype"] = None if source.dtype == "auto" else source.dtype
        fields["trust_remote_code"] = getattr(source, "trust_remote_code", None)
    if isinstance(quant, QuantConfig):
        fields["double_quant"] = quant.double_quant
        fields["blocksize"] = quant.blocksize
        fields["target_modules"] = quant.target_modules
        fields["compute_dtype"] = quant.compute_dtype
    return fields


def _plan(
    source: str | os.PathLike | ModelConfig,
    quant: str | QuantConfig | None,
    overrides: dict[str, Any],
) -> _Plan:
    """Stage 1: arguments -> `_Plan`. A keyword given explicitly (not None) wins over the
    config dataclass's field, which wins over `_DEFAULTS`."""
    fields = _config_fields(source, quant)
    chosen = {
        key: next((v for v in (overrides[key], fields[key]) if v is not None), default)
        for key, default in _DEFAULTS.items()
    }
    try:
        device = resolve_device(chosen["device"])
    except DeviceError as err:
        raise ModelLoadError(f"device={err}") from None
    dtype = _as_dtype(chosen["dtype"], torch.float32 if device.type == "cpu" else torch.bfloat16)
    return _Plan(
        source=str(source.source if isinstance(source, ModelConfig) else source),
        quant=quant.kind if isinstance(quant, QuantConfig) else quant,
        double_quant=bool(chosen["double_quant"]),
        blocksize=int(chosen["blocksize"]),
        compute_dtype=_compute_dtype(chosen["compute_dtype"], dtype, device),
        dtype=dtype,
        target_modules=chosen["target_modules"],
        device=device,
        trust_remote_code=bool(chosen["trust_remote_code"]),
    )


def _reconcile_prequantized(config: Any, plan: _Plan, directory: Path) -> tuple[_Plan, bool]:
    """Stage 3: a bitsandbytes-saved checkpoint keeps its own codebook; returns the updated
    plan and whether the checkpoint is pre-quantized."""
    stored = _prequantized(config)
    if stored is None:
        return plan, False
    delattr(config, "quantization_config")  # we quantize; transformers must not
    stored_kind = stored.get("bnb_4bit_quant_type", "nf4")
    if plan.quant is not None and plan.quant != stored_kind:
        warnings.warn(
            f"{directory} is pre-quantized as {stored_kind}; using that instead of "
            f"quant={plan.quant!r} (pass quant=None to dequantize it to {plan.dtype})",
            stacklevel=3,
        )
        plan = dataclasses.replace(plan, quant=stored_kind)
    return plan, True


def _gguf_base(plan: _Plan, config: Any, prequantized: bool) -> GGUFBase | None:
    """quant="gguf": the GGUF file whose blocks become the frozen base (None otherwise)."""
    if plan.quant != "gguf":
        return None
    path = gguf_file(plan.source)
    if path is None or prequantized:
        raise ModelLoadError(
            f"quant='gguf' keeps a .gguf file's own blocks, but {plan.source!r} is not a .gguf "
            "file or a registered GGUF model; pass one, or choose a codebook (nf4, fp4, int8, nf2)"
        )
    return GGUFBase(path, config)


class BlockSink(Protocol):
    """Takes each decoder layer as soon as it has loaded (`load_model`'s ``blocks``).

    ``start`` gets the meta-device skeleton before any tensor is read; ``block`` gets each
    decoder layer (``name`` its path in the model) once all its tensors are in and its
    targets are `QuantLinear`. The sink may change the layer in place (add adapters, shard
    it); the loader does not touch it again.
    """

    def start(self, skeleton: nn.Module) -> None: ...

    def block(self, name: str, layer: nn.Module) -> None: ...


class WeightSplit(Protocol):
    """Rewrites chosen Linear weights as they stream in, before they are quantized
    (`load_model`'s ``split``; e.g. PiSSA's residual: `qlora.nn.pissa.PissaSplit`).

    ``start`` gets the meta-device skeleton before any tensor is read; ``wants(owner)`` says
    whether the Linear at ``owner`` is rewritten; ``__call__(owner, weight)`` gets its weight
    as the file holds it and returns the one to keep (quantized if it is a target).
    """

    def start(self, skeleton: nn.Module) -> None: ...

    def wants(self, owner: str) -> bool: ...

    def __call__(self, owner: str, weight: torch.Tensor) -> torch.Tensor: ...


def _decoder_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """Path -> module of each decoder layer (``<prefix>.layers.<i>``); {} for other layouts."""
    decoder = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        return {}
    wanted = {id(layer) for layer in layers}
    return {name: m for name, m in model.named_modules() if id(m) in wanted}


def _skeleton(config: Any, plan: _Plan) -> nn.Module:
    """Stage 4: the architecture on the meta device (shapes only, no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config, dtype=plan.dtype, trust_remote_code=plan.trust_remote_code
        )
    fuse_mlps(model)  # our SwiGLU MLP over the same projections (qlora.nn.swiglu)
    fuse_norms(model)  # our RMSNorm over the same weights (qlora.nn.rms_norm)
    return model


class _Stream:
    """Stage 5: every tensor of every shard, read once, checked, and put where it goes.

    Full-precision tensors are assigned into the model as they arrive; target Linear weights
    become `QuantState`s (quantized here, or collected as a bitsandbytes group).
    """

    def __init__(
        self,
        model: nn.Module,
        plan: _Plan,
        info: LoadInfo,
        gguf_base: GGUFBase | None = None,
        sink: BlockSink | None = None,
        split: WeightSplit | None = None,
    ) -> None:
        self.model, self.plan, self.info, self.gguf_base = model, plan, info, gguf_base
        quantizing = plan.quant is not None or info.prequantized
        # An unquantized base multiplying in another dtype (compute_dtype bfloat16 over a
        # float32 model): its target Linears become CastLinear, their weights stored in the
        # compute dtype as they stream in (qlora.nn.cast_linear).
        self.casting = (  # only ever narrower: never widened, never fp16 <-> bf16
            not quantizing
            and plan.dtype == torch.float32
            and plan.compute_dtype in (torch.bfloat16, torch.float16)
        )
        targeted = quantizing or self.casting
        self.targets = set(find_targets(model, plan.target_modules)) if targeted else set()
        if self.casting:
            for owner in self.targets:
                linear = model.get_submodule(owner)
                replace_module(model, owner, CastLinear.from_linear(linear, plan.compute_dtype))
        self.slots = _Slots(model)
        self.pending: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)  # bnb groups
        self.states: dict[str, QuantState] = {}
        self.unexpected: list[str] = []
        # the sink's decoder layers and the slot names each still waits for (a bitsandbytes
        # pre-quantized layer completes only at stage 6: its layers go to the sink after)
        self.sink, self.split = sink, split
        self.delivered: set[str] = set()
        self.waiting: dict[str, set[str]] = {}
        if sink is not None and not info.prequantized:
            for prefix in _decoder_blocks(model):
                self.waiting[prefix] = {n for n in self.slots.places if n.startswith(prefix + ".")}

    def read(self, shards: list[Path], progress: bool) -> None:
        readers: list[SafetensorsReader] = []
        try:
            for shard in shards:
                try:
                    readers.append(SafetensorsReader(shard))
                except SafetensorsError as err:
                    raise ModelLoadError(str(err)) from None
            total = sum(len(r.tensors) for r in readers)
            kind = self.plan.quant or str(self.plan.dtype).removeprefix("torch.")
            label = f"load {self.info.directory.name} [{kind}]"
            bar = tqdm(total=total, desc=label, unit="tensor", disable=not progress)
            for reader in readers:
                for key in reader.names():
                    self._take(reader, key)
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

    def _take(self, reader: SafetensorsReader, key: str) -> None:
        """Place checkpoint tensor ``key``; hand a decoder layer it completes to the sink."""
        name = self._place(reader, key)
        if name is None or not self.waiting:
            return
        prefix = next((p for p in self.waiting if name.startswith(p + ".")), None)
        if prefix is None:
            return
        self.waiting[prefix].discard(name)
        if not self.waiting[prefix]:
            del self.waiting[prefix]
            self.deliver(prefix)

    def deliver(self, prefix: str) -> None:
        """Install the quantized targets of decoder layer ``prefix``; pass it to the sink."""
        states = {o: self.states.pop(o) for o in list(self.states) if o.startswith(prefix + ".")}
        _install_quantized(self.model, states, self, self.plan)
        layer = self.model.get_submodule(prefix)
        _rebuild_meta_buffers(layer, self.plan.device)
        self.delivered.add(prefix)
        self.sink.block(prefix, layer)  # type: ignore[union-attr]

    def _place(self, reader: SafetensorsReader, key: str) -> str | None:
        """Put checkpoint tensor ``key`` where it goes: pending group, quantized state or
        model slot. Returns the model's name for it when it was placed whole, else None."""
        view = reader.get(key)
        check_finite(view, key, reader.path)
        module_name, _, leaf = key.partition(".weight.")
        if leaf:  # bitsandbytes' quantization extras: weight.absmax, weight.quant_map, ...
            name = self.slots.resolve(module_name + ".weight")
            if name is None:
                self.unexpected.append(key)
            else:
                self.pending[name.removesuffix(".weight")][key] = view.clone()
            return None
        name = self.slots.resolve(key)
        if name is None:
            self.unexpected.append(key)
            return None
        owner = name.rpartition(".")[0]
        is_target = name.endswith(".weight") and owner in self.targets
        plan, device = self.plan, self.plan.device
        split = self.split
        if split is not None and name.endswith(".weight") and split.wants(owner):
            if self.gguf_base is not None or self.info.prequantized:
                raise ModelLoadError(
                    f"{self.info.directory}: {owner} must be rewritten from its full-precision "
                    "weight (PiSSA), but this checkpoint holds it quantized; use another quant"
                )
            check_shape(name, self.model.get_submodule(owner).weight.shape, view.shape)
            view = split(owner, view.to(device))
        state = None
        if is_target and self.gguf_base is not None:  # the file's own blocks, as they are
            expected = self.model.get_submodule(owner).weight.shape
            check_shape(name, expected, view.shape)
            state = self.gguf_base.state(name, expected, device)
        if state is not None:
            self.states[owner] = state
            self.info.quantized_params += view.numel()
        elif is_target and view.dtype == torch.uint8:
            self.pending[owner][key] = view.clone()  # a bitsandbytes packed weight
            return None
        elif is_target and plan.quant and plan.quant != "gguf" and not self.info.prequantized:
            check_shape(name, self.model.get_submodule(owner).weight.shape, view.shape)
            self.states[owner] = quantize(
                view.to(device), plan.quant, plan.blocksize, plan.double_quant
            )
            self.info.quantized_params += view.numel()
        else:
            target = plan.dtype if view.is_floating_point() else view.dtype
            if is_target and self.casting:
                target = plan.compute_dtype
            self.slots.assign(name, view.to(device=device, dtype=target, copy=True))
            self.info.full_precision_bytes += view.numel() * target.itemsize
        return name

    def quant_states(self) -> dict[str, QuantState]:
        """Stage 6: the quantized targets, bitsandbytes groups decoded into `QuantState`s."""
        directory = self.info.directory
        for owner, group in self.pending.items():
            weight_key = next(k for k in group if k.endswith(".weight"))
            try:
                state = QuantState.from_state_dict(group, weight_key, where=f"{directory}: {owner}")
            except (KeyError, ValueError) as err:
                raise ModelLoadError(str(err).strip("'\"")) from None
            check_shape(weight_key, self.model.get_submodule(owner).weight.shape, state.shape)
            self.states[owner] = state.to(self.plan.device)
            self.info.quantized_params += state.numel
        self.pending.clear()
        return self.states


def _install_quantized(
    model: nn.Module, states: dict[str, QuantState], stream: _Stream, plan: _Plan
) -> None:
    """Stage 7: each quantized target becomes a `QuantLinear` (or, asked for in full
    precision, a dequantized ``nn.Linear``), keeping its bias."""
    info = stream.info
    for owner, state in states.items():
        linear = model.get_submodule(owner)
        bias = linear.bias if isinstance(linear, nn.Linear) else None
        if bias is not None and _is_meta(bias):
            raise ModelLoadError(f"{info.directory}: the checkpoint has no tensor {owner}.bias")
        if plan.quant is None:  # a pre-quantized checkpoint asked for in full precision
            replacement: nn.Module = nn.Linear(
                state.shape[1],
                state.shape[0],
                bias=bias is not None,
                device=plan.device,
                dtype=plan.dtype,
            )
            with torch.no_grad():
                replacement.weight.copy_(dequantize(state, dtype=plan.dtype))
                if bias is not None:
                    replacement.bias.copy_(bias)
        else:
            replacement = QuantLinear(state, bias, compute_dtype=plan.compute_dtype)
            info.quantized_layers += 1
            info.quantized_bytes += state.storage_bytes()
        replace_module(model, owner, replacement)
        for key in (f"{owner}.weight", f"{owner}.bias"):
            stream.slots.places.pop(key, None)


def _check_complete(model: nn.Module, stream: _Stream, device: torch.device) -> None:
    """Stage 8: nothing the architecture needs is missing; unused tensors are reported."""
    directory = stream.info.directory
    missing = stream.slots.missing()
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise ModelLoadError(
            f"{directory}: the checkpoint lacks {len(missing)} tensor(s) the architecture "
            f"needs: {shown}; is it complete, and does config.json belong to it?"
        )
    if stream.unexpected:
        unexpected = stream.unexpected
        shown = ", ".join(unexpected[:5]) + (" ..." if len(unexpected) > 5 else "")
        warnings.warn(
            f"{directory}: ignored {len(unexpected)} tensor(s) the architecture does not use: "
            f"{shown}",
            stacklevel=3,
        )
    _rebuild_meta_buffers(model, device)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if _is_meta(t)]
    if leftover:
        raise ModelLoadError(f"{directory}: tensors left uninitialized: {', '.join(leftover)}")


def load_model(
    source: str | os.PathLike | ModelConfig = DEFAULT_MODEL,
    quant: BaseKind | QuantConfig | None = "nf4",
    *,
    double_quant: bool | None = None,
    blocksize: int | None = None,
    compute_dtype: torch.dtype | str | None = None,
    dtype: torch.dtype | str | None = None,
    target_modules: TargetModules | None = None,
    device: str | torch.device | None = None,
    trust_remote_code: bool | None = None,
    tokenizer: bool = True,
    progress: bool = True,
    blocks: BlockSink | None = None,
    split: WeightSplit | None = None,
) -> tuple[nn.Module, Any]:
    """Load a causal LM, quantizing its Linear layers while the tensors stream in.

    ``load_model(ModelConfig(...), QuantConfig(...))`` loads what a run config describes; a
    keyword given explicitly overrides the dataclass's field.

    Args:
        source: a Hugging Face directory (``model.safetensors`` or a sharded index), a
            directory saved pre-quantized by bitsandbytes, a ``.gguf`` file, a registered
            name (default ``smollm2-135m``), or a `ModelConfig` (source, dtype, device and,
            when it has one, trust_remote_code).
        quant: ``"nf4"``, ``"fp4"``, ``"int8"``, ``"nf2"``, ``"gguf"`` (a .gguf's own blocks,
            kept as they are), None (full precision), or a
            `QuantConfig` (kind, double_quant, blocksize, compute_dtype, target_modules).
        double_quant: quantize the block scales too (QLoRA's double quantization; default
            True).
        blocksize: elements per quantization block (default 64).
        compute_dtype: dtype the quantized weights are dequantized to for matmuls
            (default: ``dtype``; "auto": bfloat16 where the hardware multiplies it natively,
            else float32, as `qlora.hardware.choose_compute_dtype` decides).
        dtype: dtype of everything kept in full precision - embeddings, norms, the output
            head, and the Linear weights when ``quant`` is None. Default float32 on CPU
            (no fast bf16 there) and bfloat16 on CUDA.
        target_modules: Linear layers to quantize ("all-linear", the default: all but the
            output head).
        device: where the model is built ("cpu" by default; "auto": CUDA when available;
            a `ModelConfig`'s own default is "auto"); tensors go there as they are read.
        trust_remote_code: run the model folder's own Python (``auto_map``) if it has any.
            Default False: such a model is refused with an error naming the directory.
        tokenizer: also load the tokenizer (returns None in its place when False).
        progress: show a progress bar.
        blocks: a `BlockSink` that takes each decoder layer as soon as it has loaded (FSDP
            shards it there, so no process holds the whole base); the layers of a
            bitsandbytes pre-quantized checkpoint go to it at the end of loading.
        split: a `WeightSplit` that rewrites chosen weights as they stream in, before they
            are quantized (PiSSA's residual: the full-precision model never exists).

    Returns:
        ``(model, tokenizer)``; the model is in eval mode with ``model.qlora_load_info``.

    Raises:
        ModelLoadError: a missing file or shard, a corrupt or truncated safetensors file, an
            unknown architecture, custom code without ``trust_remote_code``, NaN/inf weights,
            weights that do not fit the config, or an unavailable device; the message names
            the file, tensor or device.
    """
    start = time.perf_counter()
    overrides = {
        "double_quant": double_quant,
        "blocksize": blocksize,
        "compute_dtype": compute_dtype,
        "dtype": dtype,
        "target_modules": target_modules,
        "device": device,
        "trust_remote_code": trust_remote_code,
    }
    plan = _plan(source, quant, overrides)  # 1. arguments
    directory = resolve_checkpoint(plan.source)  # 2. files
    config = _load_config(directory, plan.trust_remote_code)
    shards = _shards(directory)
    plan, prequantized = _reconcile_prequantized(config, plan, directory)  # 3.
    gguf_base = _gguf_base(plan, config, prequantized)
    model = _skeleton(config, plan)  # 4.
    info = LoadInfo(plan.source, directory, plan.quant, prequantized, shards=shards)
    stream = _Stream(model, plan, info, gguf_base, blocks, split)
    if blocks is not None:
        blocks.start(model)
    if split is not None:
        split.start(model)
    stream.read(shards, progress)  # 5.
    _install_quantized(model, stream.quant_states(), stream, plan)  # 6., 7.
    _check_complete(model, stream, plan.device)  # 8.
    if blocks is not None:  # the layers the stream did not complete (pre-quantized ones)
        for prefix, layer in _decoder_blocks(model).items():
            if prefix not in stream.delivered:
                stream.delivered.add(prefix)
                blocks.block(prefix, layer)
    if gguf_base is not None:
        info.gguf_blocks = gguf_base.summary()
        if gguf_base.full_precision:
            warnings.warn(f"{gguf_base.path.name}: {info.gguf_blocks}", stacklevel=2)
    model.eval()
    _trim_heap()
    _attach_generation_config(model, directory)
    info.seconds = time.perf_counter() - start
    model.qlora_load_info = info
    loaded = _load_tokenizer(directory, plan.trust_remote_code) if tokenizer else None
    return model, loaded


def _attach_generation_config(model: nn.Module, directory: Path) -> None:
    if not (directory / "generation_config.json").is_file():
        return
    from transformers import GenerationConfig

    try:
        model.generation_config = GenerationConfig.from_pretrained(directory)
    except (OSError, ValueError) as err:
        warnings.warn(f"{directory}: generation_config.json ignored ({err})", stacklevel=3)


def _load_tokenizer(directory: Path, trust_remote_code: bool = False) -> Any:
    if not any((directory / name).is_file() for name in _TOKENIZER_FILES):
        raise ModelLoadError(
            f"{directory}: no tokenizer files ({', '.join(_TOKENIZER_FILES)}); copy them in, "
            "or pass tokenizer=False"
        )
    from transformers import AutoTokenizer

    auto_map = _auto_map(directory / "tokenizer_config.json")
    try:
        return AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        if auto_map and not trust_remote_code:
            raise _custom_code_error(directory, "tokenizer_config.json", auto_map) from None
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ModelLoadError(f"{directory}: cannot load the tokenizer: {first}") from None
