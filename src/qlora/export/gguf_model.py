"""A model with its adapters merged, written as one GGUF file that llama.cpp runs on its own.

Each adapted layer's weight is the one `qlora.export_merged` writes: scaling·B@A added to the
*dequantized* base weight the adapter was trained against (`qlora.nn.merged_weight`, via the
merge plan of `qlora.adapters.merge`; `_fast_merge` computes the same bits with fewer copies
for the usual LoRA-over-QuantLinear layer), computed in float32 one tensor at a time and
streamed into the file (quantized in row groups, `quantize_rows`), so the export needs the
memory of the largest tensor, not of the model.

The file holds the architecture's metadata (``general.architecture`` = ``llama`` for Llama and
Mistral, ``qwen2`` for Qwen2), the tokenizer and the chat template
(`qlora.export.tokenizer_meta`), and the tensors under llama.cpp's names
(`qlora.models.gguf_names`), query/key rows permuted to llama.cpp's rope layout where the
architecture needs it. Types follow llama.cpp's converter: norms and other 1-D tensors stay
F32; ``f16`` / ``bf16`` / ``q8_0`` / ``q4_0`` / ``q4_1`` apply to the 2-D weights through
the ``gguf`` package's own `gguf.quants.quantize`; a weight whose rows do not split into
quantization blocks falls back to F16 as the converter does; for q4_0 / q4_1 the output head
(``output.weight``, or ``token_embd.weight`` when tied) is Q8_0, as llama.cpp's quantizer
keeps it at higher precision (the 4-bit head costs the most quality).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf.gguf_writer import WriterState
from torch import nn

from qlora.adapters.merge import merge_plan
from qlora.export.fidelity import fidelity_path, fidelity_report, write_fidelity_report
from qlora.export.tokenizer_meta import add_tokenizer, tokenizer_meta
from qlora.files import atomic_open, check_file_destination
from qlora.models.gguf_names import GGUFArch, gguf_arch, gguf_tensor_name, permute_qk, qk_heads
from qlora.nn import LoRALinear, QuantLinear

__all__ = [
    "GGUF_TYPES",
    "QUANTIZE_CHUNK_ELEMENTS",
    "GGUFExportError",
    "GGUFTensor",
    "check_gguf_destination",
    "export_gguf",
    "gguf_tensors",
    "quantize_rows",
]

Q = gguf.GGMLQuantizationType
F = gguf.LlamaFileType

# --type name -> (the ggml type of 2-D weights, general.file_type)
GGUF_TYPES: dict[str, tuple[Q, F]] = {
    "f32": (Q.F32, F.ALL_F32),
    "f16": (Q.F16, F.MOSTLY_F16),
    "bf16": (Q.BF16, F.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, F.MOSTLY_Q8_0),
    "q4_0": (Q.Q4_0, F.MOSTLY_Q4_0),
    "q4_1": (Q.Q4_1, F.MOSTLY_Q4_1),
}


class GGUFExportError(ValueError):
    """The model cannot be exported to GGUF as asked; the message names the culprit."""


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of the file: its GGUF name and type, HF shape, and how to compute it."""

    name: str
    qtype: Q
    shape: tuple[int, ...]  # [out, in] / [n]: torch order (the writer reverses it)
    make: Callable[[], torch.Tensor]  # float32, llama.cpp's row order

    @property
    def nbytes(self) -> int:
        shape = gguf.quant_shape_to_byte_shape(self.shape, self.qtype)
        return int(np.prod(shape))


def _config_value(config: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta if theta is not None else _config_value(config, "rope_theta", default=1e4))


def _rope(config: Any) -> tuple[str, dict[str, Any]]:
    """(rope type, its parameters): transformers 5's ``rope_parameters`` or ``rope_scaling``."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    params = dict(params or {})
    return str(params.get("rope_type", params.get("type")) or "default"), params


def _check_rope_scaling(config: Any, arch: GGUFArch) -> None:
    kind, _ = _rope(config)
    supported = ("default", "linear", "llama3") if arch.name == "llama" else ("default", "linear")
    if kind not in supported:
        raise GGUFExportError(
            f"rope scaling {kind!r} is not supported by the GGUF export of {arch.hf_name}; "
            f"supported: {', '.join(supported)}"
        )


def _llama3_freq_factors(config: Any, head_dim: int) -> torch.Tensor:
    """llama.cpp's ``rope_freqs`` [head_dim/2]: each frequency is divided by its factor.

    Llama 3's rope keeps high frequencies, divides low ones by ``factor`` and blends in
    between (transformers' ``_compute_llama3_parameters``); the factor is old/new frequency.
    """
    _, p = _rope(config)
    freqs = 1.0 / (_rope_theta(config) ** (torch.arange(0, head_dim, 2).double() / head_dim))
    old = float(p["original_max_position_embeddings"])
    low, high, factor = (
        float(p["low_freq_factor"]),
        float(p["high_freq_factor"]),
        float(p["factor"]),
    )
    wavelen = 2 * math.pi / freqs
    smooth = (old / wavelen - low) / (high - low)
    factors = 1.0 / ((1 - smooth) / factor + smooth)  # the blend's old/new ratio
    factors = torch.where(wavelen < old / high, torch.ones_like(factors), factors)
    factors = torch.where(wavelen > old / low, torch.full_like(factors, factor), factors)
    return factors.float()


def _qtype(name: str, shape: tuple[int, ...], wanted: Q, tied: bool) -> Q:
    if len(shape) < 2 or name.endswith("_norm.weight"):
        return Q.F32  # as llama.cpp's converter: 1-D tensors and norms stay F32
    if wanted in (Q.Q4_0, Q.Q4_1) and (
        name == "output.weight" or (tied and name == "token_embd.weight")
    ):
        wanted = Q.Q8_0
    block = gguf.GGML_QUANT_SIZES[wanted][0]
    if shape[-1] % block:
        return Q.F16  # rows do not split into blocks: the converter's fallback
    return wanted


class _DeltaBuffer:
    """One float32 buffer reused for every layer's B@A: a fresh [out, in] tensor per layer
    page-faults its memory in again. With it, a 7B up_proj (11008 x 4096) merges in 0.37 s
    instead of merged_weight's 0.83 s on the 2-core box."""

    def __init__(self) -> None:
        self.flat = torch.empty(0)

    def view(self, rows: int, cols: int) -> torch.Tensor:
        if self.flat.numel() < rows * cols:
            self.flat = torch.empty(rows * cols)
        return self.flat[: rows * cols].view(rows, cols)  # contiguous prefix


def _fast_merge(module: nn.Module, delta: _DeltaBuffer) -> Callable[[], torch.Tensor] | None:
    """`qlora.nn.merged_weight` for the common layer, with fewer copies; None elsewhere.

    The common layer: a LoRALinear over a QuantLinear, nothing merged in place, float32
    adapters. Its merged weight is computed as merged_weight does it (W = dequantize, then
    W + (B @ A) * scaling per active adapter, the same float32 operations in the same
    order, so the same bits; tested) but into the freshly dequantized W and a reused B@A
    buffer, instead of four new [out, in] tensors. Anything else returns None and takes
    the merge plan's own (reference) path.
    """
    if not isinstance(module, LoRALinear) or not isinstance(module.base_layer, QuantLinear):
        return None
    if module.merged_adapters or module._unmerged_base is not None:
        return None
    names = [] if module.disabled else [n for n in module.active_adapters if n in module.lora_A]
    if any(n in module.lora_magnitude_vector for n in names):
        return None  # DoRA rescales rows: merged_weight's own path
    pairs = [(module.lora_B[n].weight, module.lora_A[n].weight, module.scaling[n]) for n in names]
    if any(b.dtype != torch.float32 or a.dtype != torch.float32 for b, a, _ in pairs):
        return None
    base = module.base_layer

    def make() -> torch.Tensor:
        weight = base.dequantized_weight(torch.float32)  # [out, in], a new tensor: ours
        for b, a, scaling in pairs:  # b [out, r], a [r, in]
            product = delta.view(b.shape[0], a.shape[1])  # [out, in]
            torch.mm(b.detach(), a.detach(), out=product)
            weight.add_(product.mul_(scaling))
        return weight

    return make


def gguf_tensors(model: nn.Module, arch: GGUFArch, wanted: Q) -> list[GGUFTensor]:
    """The file's tensors, in the model's state-dict order, each computed when asked.

    The ``make`` of merged LoRA layers share one scratch buffer (`_fast_merge`): call them
    one at a time, as `export_gguf` does; each result is a tensor of its own.

    Raises:
        qlora.models.gguf_names.UnsupportedArchitectureError: a tensor with no GGUF name.
    """
    config = model.config
    n_layers = int(config.num_hidden_layers)
    n_head = int(config.num_attention_heads)
    n_kv = int(_config_value(config, "num_key_value_heads", default=n_head))
    plan = merge_plan(model, None, torch.float32)
    names = {e.name for e in plan.entries}
    tied = "lm_head.weight" not in names
    modules = dict(model.named_modules())
    delta = _DeltaBuffer()
    out = []
    for entry in plan.entries:
        name = gguf_tensor_name(entry.name, arch, n_layers)
        heads = qk_heads(entry.name, arch, n_head, n_kv)
        owner = modules.get(entry.name.removesuffix(".weight"))
        fast = _fast_merge(owner, delta) if entry.name.endswith(".weight") else None

        def make(make: Callable[[], torch.Tensor] = fast or entry.make, heads: int | None = heads):
            tensor = make().detach().float().cpu()  # [out, in] or [n]
            return tensor if heads is None else permute_qk(tensor, heads)

        out.append(GGUFTensor(name, _qtype(name, entry.shape, wanted, tied), entry.shape, make))
    if _rope(config)[0] == "llama3":
        head_dim = int(_config_value(config, "head_dim", default=config.hidden_size // n_head))
        factors = _llama3_freq_factors(config, head_dim)  # [head_dim / 2]
        out.insert(0, GGUFTensor("rope_freqs.weight", Q.F32, tuple(factors.shape), lambda: factors))
    return out


def _add_metadata(writer: gguf.GGUFWriter, model: nn.Module, name: str, file_type: F) -> None:
    config = model.config
    n_head = int(config.num_attention_heads)
    head_dim = int(_config_value(config, "head_dim", default=config.hidden_size // n_head))
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(int(_config_value(config, "num_key_value_heads", default=n_head)))
    writer.add_rope_freq_base(_rope_theta(config))
    kind, rope = _rope(config)
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(int(file_type))
    if file_type not in (F.ALL_F32, F.MOSTLY_F16, F.MOSTLY_BF16):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _model_name(model: nn.Module) -> str:
    info = getattr(model, "qlora_load_info", None)
    source = getattr(info, "source", None) or getattr(model.config, "_name_or_path", "") or ""
    return Path(str(source)).name or type(model).__name__


def check_gguf_destination(path: str | os.PathLike, overwrite: bool) -> None:
    """Refuse ``path`` when it is a directory, or an existing file without ``overwrite``.

    Raises:
        qlora.files.DestinationError: the one-line reason and the way out.
    """
    check_file_destination(path, overwrite=overwrite)


# Values quantized per `gguf.quants.quantize` call: its numpy temporaries are several times
# the float32 input, and a 7B model's embedding and head are 131M values (0.5 GB) each;
# 16M values per call bound them near 0.3 GB at the same speed (bench_export.py: the 7B q4_0
# export's peak RSS went from 5.75 to 5.53-5.57 GB with this and `_fast_merge`).
QUANTIZE_CHUNK_ELEMENTS = 1 << 24


def quantize_rows(data: np.ndarray, qtype: Q) -> np.ndarray:
    """`gguf.quants.quantize` applied to groups of rows: the same bytes, bounded temporaries.

    Every type quantizes each row on its own (blocks never straddle rows), so quantizing
    row groups and stacking them is byte-for-byte ``gguf.quants.quantize(data, qtype)``.

    Args:
        data: float32, [out, in] (or [n]: quantized in one call).
        qtype: any type `gguf.quants.quantize` supports.
    """
    rows = max(1, QUANTIZE_CHUNK_ELEMENTS // max(1, data.shape[-1]))
    if data.ndim != 2 or data.shape[0] <= rows:
        return gguf.quants.quantize(data, qtype)
    first = gguf.quants.quantize(data[:rows], qtype)  # [rows, bytes per row] (F16: [rows, in])
    out = np.empty((data.shape[0], *first.shape[1:]), dtype=first.dtype)
    out[:rows] = first
    for start in range(rows, data.shape[0], rows):
        out[start : start + rows] = gguf.quants.quantize(data[start : start + rows], qtype)
    return out


def _array(tensor: GGUFTensor) -> np.ndarray:
    data = tensor.make().numpy()  # float32, [out, in] or [n]
    if tensor.qtype == Q.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    return quantize_rows(data, tensor.qtype)  # f16 / bf16 bytes / blocks


def _progress(items: list[GGUFTensor], enabled: bool, path: Path) -> Any:
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=f"export {path.name}", unit="tensor")


@torch.no_grad()
def export_gguf(
    model: nn.Module,
    out_path: str | os.PathLike,
    tokenizer: Any,
    *,
    type: str = "f16",
    overwrite: bool = False,
    progress: bool = True,
    fidelity: bool = False,
) -> Path:
    """Write ``model`` with its active adapters merged as one llama.cpp GGUF file.

    ``model`` is not modified; QuantLinear bases are dequantized and each active adapter
    folded in (in float32) before the tensor is converted to ``type``. The file is written
    through `qlora.files.atomic_open`: a temporary file renamed into place when complete.

    Args:
        model: a transformers ``LlamaForCausalLM``, ``MistralForCausalLM`` or
            ``Qwen2ForCausalLM`` (possibly quantized, possibly with LoRA adapters).
        out_path: the ``.gguf`` file to write; its directory is created if missing.
        tokenizer: the model's Hugging Face fast tokenizer (vocabulary, merges, special
            tokens and chat template go into the file).
        type: the 2-D weights' type, one of `GGUF_TYPES` (norms and 1-D tensors stay F32).
        overwrite: replace an existing file at ``out_path``.
        progress: show a progress bar over the tensors.
        fidelity: after writing, compare the file with ``model``'s own forward on held-out
            text (`qlora.export.fidelity.fidelity_report`: top-1 agreement, mean KL, max
            |Δlogit|) and write the report beside it as ``<out_path>.fidelity.json``
            (`qlora.export.fidelity.read_fidelity_report` reads it back). Costs a float32
            copy of the model (4 bytes/parameter) and a few forward passes.

    Returns:
        ``out_path`` as a Path.

    Raises:
        GGUFExportError: unknown ``type``, rope scaling other than linear / llama3 (Llama
            and Mistral) or linear (Qwen2), or no ``model.config``.
        qlora.models.gguf_names.UnsupportedArchitectureError: not one of the architectures.
        qlora.export.tokenizer_meta.TokenizerError: a tokenizer that cannot be written.
        qlora.files.DestinationError: ``out_path`` (or, with ``fidelity``, its report)
            exists (without ``overwrite``), is a directory.
    """
    if type not in GGUF_TYPES:
        raise GGUFExportError(f"unknown GGUF type {type!r}; choose one of {', '.join(GGUF_TYPES)}")
    if not hasattr(model, "config"):
        raise GGUFExportError(f"{model.__class__.__name__} has no .config; export needs a model")
    path = Path(out_path)
    arch = gguf_arch(model)
    _check_rope_scaling(model.config, arch)
    check_gguf_destination(path, overwrite)
    if fidelity:
        check_gguf_destination(fidelity_path(path), overwrite)
    wanted, file_type = GGUF_TYPES[type]
    tensors = gguf_tensors(model, arch, wanted)
    vocab_rows = next(t.shape[0] for t in tensors if t.name == "token_embd.weight")
    meta = tokenizer_meta(tokenizer, vocab_rows)  # before writing: a bad tokenizer fails early
    writer = gguf.GGUFWriter(None, arch.name)
    _add_metadata(writer, model, _model_name(model), file_type)
    add_tokenizer(writer, meta)
    for t in tensors:
        byte_shape = gguf.quant_shape_to_byte_shape(t.shape, t.qtype)
        if t.qtype in (Q.F32, Q.F16):
            dtype = np.float32 if t.qtype == Q.F32 else np.float16
            writer.add_tensor_info(t.name, t.shape, np.dtype(dtype), t.nbytes)
        else:
            writer.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), t.nbytes, t.qtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as f:
        # The writer streams into our atomic file: open_output_file() accepts an already
        # open, empty output (state EMPTY), so nothing is written outside qlora.files.
        writer.fout, writer.path, writer.state = [f], path, WriterState.EMPTY
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in _progress(tensors, progress, path):
            writer.write_tensor_data(_array(t))
        writer.fout = None  # atomic_open closes, fsyncs and renames the file
    if fidelity:
        write_fidelity_report(fidelity_report(model, tokenizer, path))
    return path
