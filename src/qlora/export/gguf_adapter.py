"""A PEFT LoRA adapter as a llama.cpp LoRA adapter GGUF (``llama-cli -m base.gguf --lora``).

What llama.cpp reads (``src/llama-adapter.cpp``): ``general.type = "adapter"``,
``general.architecture`` equal to the base model's, ``adapter.type = "lora"``, one float
``adapter.lora.alpha`` for the whole file, and for each adapted weight ``<name>`` of the base
GGUF (``blk.3.attn_q.weight``) the pair ``<name>.lora_a`` (numpy shape [r, in], as PEFT's A)
and ``<name>.lora_b`` ([out, r], as PEFT's B). It adds ``scale · B @ (A @ x)`` to the layer's
output with ``scale = alpha / r``, r read off each B.

That one alpha cannot express rsLoRA (``alpha / sqrt(r)``) or PEFT's per-layer
``rank_pattern`` / ``alpha_pattern``, which llama.cpp's own ``convert_lora_to_gguf.py``
ignores. Here each layer's true scale ``s`` is folded into its B:
``B_file = B · s / (alpha_file / r)``. ``alpha_file`` is chosen so the factor is exactly 1
for every layer with the adapter's default rank and alpha (those B are copied bit for bit);
the others are scaled once, in float64, then rounded to float32.

For the ``llama`` architecture llama.cpp stores the rows of W_q / W_k permuted (see
`qlora.models.gguf_names`); the update ``B @ A`` lives in W's space, so B's rows are
permuted the same way and A is left alone.

Everything is validated (config, every key and shape against the base architecture, finite
values, supported targets) before a byte is written; the file is then written atomically.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qlora.adapters._peft_files import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    Spec,
    check_finite,
    find_files,
    match_weights,
    parse_config,
    read_weights,
)
from qlora.adapters.merge import ExportError
from qlora.files import DestinationError, atomic_open, check_file_destination
from qlora.models.gguf_names import (
    GGUFArch,
    UnsupportedArchitectureError,
    gguf_arch,
    gguf_tensor_name,
    permute_qk,
    qk_heads,
)

__all__ = [
    "AdapterTensor",
    "export_adapter_gguf",
    "file_alpha",
    "gguf_adapter_tensors",
    "llama_cpp_scale",
]

# The layers of a Llama-family block llama.cpp applies a LoRA to that we export.
_SUPPORTED = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
_BLOCK = re.compile(r"^blk\.\d+\.(?P<kind>[a-z_]+)$")


@dataclass(frozen=True)
class AdapterTensor:
    """One adapted layer as written: ``name`` is the base GGUF tensor's (``blk.0.attn_q.weight``).

    Attributes:
        module: the HF module name (``model.layers.0.self_attn.q_proj``).
        name: the base tensor's GGUF name; the file holds ``name + ".lora_a"`` / ``".lora_b"``.
        lora_a: [r, in] float32, PEFT's A unchanged.
        lora_b: [out, r] float32, B with the scale folded in and (q/k) rows permuted.
        scale: the layer's true scale (alpha/r, or alpha/sqrt(r) with rsLoRA).
        factor: what B was multiplied by (1.0: copied exactly).
        heads: the head count its rows were permuted by, or None.
    """

    module: str
    name: str
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scale: float
    factor: float
    heads: int | None


def _true_scale(spec: Spec, module: str) -> tuple[int, float]:
    """(r, scale) of one layer, as `qlora.nn.lora.LoRALinear` computes it."""
    r, alpha = spec.rank_alpha(module)
    return r, alpha / (math.sqrt(r) if spec.use_rslora else r)


def file_alpha(spec: Spec) -> float:
    """The file's ``adapter.lora.alpha`` (float32): llama.cpp's alpha/r equals the default
    layer's true scale, so the common case needs no folding."""
    default_scale = spec.alpha / (math.sqrt(spec.r) if spec.use_rslora else spec.r)
    return float(np.float32(default_scale * spec.r))


def llama_cpp_scale(alpha: float, r: int) -> float:
    """The scale llama.cpp applies (``get_scale``: float32 alpha / rank; 1 when alpha is 0)."""
    if alpha == 0:
        return 1.0
    return float(np.float32(alpha) / np.float32(r))


# -- the base architecture -------------------------------------------------------------------


def _config_of(model: Any) -> Any:
    """A transformers config from what the caller gave: a model, a config, or a source."""
    if isinstance(model, nn.Module):
        config = getattr(model, "config", None)
        if config is None:
            raise ExportError(f"model={type(model).__name__} has no .config; pass a HF model")
        return config
    if isinstance(model, str | os.PathLike):
        return _load_config(str(model))
    if hasattr(model, "model_type"):
        return model  # a transformers PretrainedConfig
    raise ExportError(
        f"model= must be a model, a transformers config or a checkpoint path/name, "
        f"got {type(model).__name__}"
    )


def _load_config(source: str) -> Any:
    """The config only (no weights), from a directory, a .gguf file or a registered name."""
    from transformers import AutoConfig

    from qlora.models import resolve_checkpoint

    directory = resolve_checkpoint(source)
    try:
        return AutoConfig.from_pretrained(directory, trust_remote_code=False)
    except (ValueError, KeyError, OSError) as err:
        raise ExportError(
            f"{directory}: cannot read the model config ({str(err).splitlines()[0]})"
        ) from None


def _base_config(model: Any, adapter_dir: Path) -> Any:
    """``model``'s config, or else the config of the adapter's ``base_model_name_or_path``."""
    if model is not None:
        return _config_of(model)
    config_path, _ = find_files(adapter_dir)
    parse_config(config_path)  # a malformed config fails here, with the reader's message
    base = json.loads(config_path.read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base:
        raise ExportError(
            f"{config_path}: base_model_name_or_path is not set; pass the base model "
            "(--model / model=) so its architecture is known"
        )
    try:
        return _load_config(str(base))
    except (ExportError, ValueError, RuntimeError) as err:
        raise ExportError(
            f"{config_path}: its base model {base!r} cannot be loaded ({err}); pass the base "
            "model (--model / model=)"
        ) from None


def _skeleton(config: Any) -> nn.Module:
    """The architecture on the meta device: the shapes `match_weights` checks against."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=False)


# -- tensors ---------------------------------------------------------------------------------


def _gguf_name(module: str, arch: GGUFArch, n_layers: int, where: Path) -> str:
    """``blk.N.attn_q.weight`` for a supported target; a one-line error for any other."""
    try:
        name = gguf_tensor_name(module, arch, n_layers)
    except UnsupportedArchitectureError:
        name = ""
    match = _BLOCK.match(name)
    if match is None or match["kind"] not in _SUPPORTED:
        raise ExportError(
            f"{where}: adapts {module!r}, which the llama.cpp adapter export does not support; "
            "only the attention and MLP projections (q_proj, k_proj, v_proj, o_proj, "
            "gate_proj, up_proj, down_proj) can be exported"
        )
    return name + ".weight"


def gguf_adapter_tensors(
    adapter_dir: str | os.PathLike, config: Any
) -> tuple[GGUFArch, float, list[AdapterTensor]]:
    """Read, validate and convert an adapter: (architecture, file alpha, tensors in model order).

    Nothing is written. Raises the reader's `AdapterNotFoundError` / `AdapterFormatError`
    (missing, malformed, corrupt or mismatched files), `UnsupportedArchitectureError`, or
    `ExportError` (a target llama.cpp cannot take).
    """
    adapter_dir = Path(adapter_dir)
    config_path, weights_path = find_files(adapter_dir)
    spec = parse_config(config_path)
    arch = gguf_arch(config)
    skeleton = _skeleton(config)
    pairs = match_weights(skeleton, read_weights(weights_path), spec, weights_path)
    check_finite(pairs, weights_path)
    alpha = file_alpha(spec)
    n_layers = int(config.num_hidden_layers)
    n_head = int(config.num_attention_heads)
    n_head_kv = int(getattr(config, "num_key_value_heads", None) or n_head)
    order = [name for name, _ in skeleton.named_modules() if name in pairs]
    tensors = []
    for module in order:
        weight_a, weight_b = pairs[module]  # [r, in], [out, r]
        name = _gguf_name(module, arch, n_layers, weights_path)
        r, scale = _true_scale(spec, module)
        factor = scale / llama_cpp_scale(alpha, r)
        lora_b = weight_b.float() if factor == 1.0 else (weight_b.double() * factor).float()
        heads = qk_heads(module, arch, n_head, n_head_kv)
        if heads is not None:
            lora_b = permute_qk(lora_b, heads)  # W = B @ A: W's rows are B's rows
        tensors.append(
            AdapterTensor(
                module=module,
                name=name,
                lora_a=weight_a.float().contiguous(),
                lora_b=lora_b.contiguous(),
                scale=scale,
                factor=factor,
                heads=heads,
            )
        )
    return arch, alpha, tensors


# -- writing ---------------------------------------------------------------------------------


def _check_out(out_path: Path, adapter_dir: Path, overwrite: bool) -> None:
    """Refuse before any work: a directory, an existing file without overwrite."""
    check_file_destination(out_path, overwrite=overwrite)
    inputs = {(adapter_dir / name).resolve() for name in (CONFIG_NAME, WEIGHTS_NAME)}
    if out_path.resolve() in inputs:  # even with overwrite: it would destroy the input
        raise DestinationError(f"{out_path} is a file of the adapter being exported")


@contextmanager
def _writer_into(path: Path, arch: str) -> Iterator[Any]:
    """A `gguf.GGUFWriter` whose output is `qlora.files.atomic_open`'s temporary file."""
    import gguf
    from gguf.gguf_writer import WriterState

    with atomic_open(path, "wb") as f:
        writer = gguf.GGUFWriter(None, arch)
        yield writer
        # GGUFWriter opens its own file by name; hand it ours so the write stays atomic.
        writer.path, writer.fout, writer.state = path, [f], WriterState.EMPTY
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.fout = None  # atomic_open closes (and publishes) the file


def export_adapter_gguf(
    adapter_dir: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    model: Any = None,
    overwrite: bool = False,
) -> Path:
    """Write the PEFT adapter in ``adapter_dir`` as a llama.cpp LoRA adapter GGUF.

    The adapter applies on top of the base model's GGUF (any quantization of it):
    ``llama-cli -m base.gguf --lora out.gguf``, ``Llama(model_path=..., lora_path=...)``, or
    Ollama's ``ADAPTER``. rsLoRA and rank/alpha patterns are folded into B (module docstring).
    Tensors are float32 (adapters are small; no precision is lost).

    Args:
        adapter_dir: a PEFT adapter directory (``adapter_config.json`` +
            ``adapter_model.safetensors``), as `qlora.save_adapter` writes.
        out_path: the ``.gguf`` file to write; its directory is created if missing.
        model: the base model's architecture when the adapter's ``base_model_name_or_path``
            cannot be loaded: a model (its ``.config`` is used), a transformers config, or a
            checkpoint directory / ``.gguf`` file / registered name (config only is read).
        overwrite: replace an existing ``out_path``.

    Returns:
        ``Path(out_path)``.

    Raises:
        AdapterNotFoundError, AdapterFormatError: missing, malformed or corrupt adapter files,
            or weights that do not fit the base architecture.
        UnsupportedArchitectureError: the base is not a Llama-family architecture.
        ExportError: the base cannot be determined, or a target llama.cpp cannot take.
        DestinationError: ``out_path`` exists (without ``overwrite``) or is a directory.
    """
    adapter_dir, out_path = Path(adapter_dir), Path(out_path)
    _check_out(out_path, adapter_dir, overwrite)
    config = _base_config(model, adapter_dir)
    arch, alpha, tensors = gguf_adapter_tensors(adapter_dir, config)
    import gguf

    out_path.parent.mkdir(parents=True, exist_ok=True)
    with _writer_into(out_path, arch.name) as writer:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_name(adapter_dir.resolve().name)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        for tensor in tensors:
            writer.add_tensor(tensor.name + ".lora_a", tensor.lora_a.numpy())
            writer.add_tensor(tensor.name + ".lora_b", tensor.lora_b.numpy())
    return out_path
