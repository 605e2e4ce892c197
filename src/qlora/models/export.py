"""Write a model with `QuantLinear` layers as a pre-quantized checkpoint directory.

nf4/fp4 models are written exactly as transformers + bitsandbytes write a 4-bit model:
``config.json`` with a ``quantization_config`` of ``quant_method: bitsandbytes`` and the
``Linear4bit`` tensors (``weight`` packed uint8, ``weight.absmax``, ``weight.quant_map``,
``weight.nested_*``, ``weight.quant_state.bitsandbytes__<kind>``), so
``AutoModelForCausalLM.from_pretrained(dir)`` with bitsandbytes installed loads it, and so
does `qlora.load_model` (byte for byte, nothing re-quantized). int8 and nf2, which
bitsandbytes does not have, use the same layout under ``quant_method: qlora``; only qlora
loads those.

Where it writes: a new or empty directory; an existing one with other files only with
``overwrite=True``, and then only the files written here are replaced. Never the directory
the model was loaded from (`qlora.models.destination`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qlora.files import staged_directory
from qlora.models.destination import MODEL_FILES, check_model_destination
from qlora.models.safetensors_io import write_safetensors
from qlora.nn.qlinear import QuantLinear
from qlora.quant.codebooks import BNB_KINDS

__all__ = ["save_quantized"]


def _quantization_config(layers: list[tuple[str, QuantLinear]], model: nn.Module) -> dict:
    kinds = {q.quant_state.kind for _, q in layers}
    nested = {q.quant_state.nested is not None for _, q in layers}
    if len(kinds) != 1 or len(nested) != 1:
        raise ValueError(
            f"cannot describe mixed quantization ({sorted(kinds)}, double quant {nested}) in "
            "one quantization_config; quantize every target layer the same way"
        )
    kind, double_quant = kinds.pop(), nested.pop()
    names = {n for n, _ in layers}
    skipped = sorted(
        {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        - {n.rsplit(".", 1)[-1] for n in names}
    )
    compute = str(layers[0][1].compute_dtype).removeprefix("torch.")
    return {
        "quant_method": "bitsandbytes" if kind in BNB_KINDS else "qlora",
        "load_in_4bit": kind in BNB_KINDS,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": kind,
        "bnb_4bit_use_double_quant": double_quant,
        "bnb_4bit_compute_dtype": compute,
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": skipped or None,
    }


def save_quantized(
    model: nn.Module,
    directory: str | os.PathLike,
    tokenizer: Any = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (with QuantLinear layers) and ``tokenizer`` to ``directory``.

    The files are written into a temporary directory and moved into place only when all
    are complete (`qlora.files.staged_directory`), with the user's umask.

    Args:
        model: a model with `QuantLinear` layers (``load_model(..., quant="nf4")``).
        directory: a new or empty directory (created when missing).
        tokenizer: saved alongside when given.
        overwrite: write into a directory that holds other files: replace only the files
            written here (``config.json``, ``generation_config.json``, ``model.safetensors``,
            tokenizer files) and keep every other. Refused even so: the directory the model
            was loaded from, and one holding weights, adapters or tokenizer files that the
            new files would not replace (old shards, say) - they are named, never deleted.

    Returns:
        The directory.

    Raises:
        ValueError: the model has no quantized layers.
        qlora.files.DestinationError: the destination is refused, as above.
    """
    directory = Path(directory)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    if not layers:
        raise ValueError("the model has no quantized layers: load it with quant='nf4' (or fp4...)")
    if any(m.quant_state.is_gguf for _, m in layers):
        raise ValueError(
            "the model's base is a GGUF file's own blocks (quant='gguf'): that .gguf already is "
            "the quantized checkpoint; load it again with quant='gguf' instead of saving a copy"
        )
    check_model_destination(directory, model, overwrite)
    config = model.config.to_dict()
    config["quantization_config"] = _quantization_config(layers, model)
    with staged_directory(directory, last=["config.json"], stale=MODEL_FILES) as staging:
        type(model.config).from_dict(config).save_pretrained(staging)
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(staging)
        write_safetensors(staging / "model.safetensors", _tensors(model), {"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
    return directory


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict, each tied alias once (transformers re-ties it from config on load)."""
    seen: set[int] = set()
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen and tensor.numel() > 1 and name.endswith(".weight"):
            continue
        seen.add(ptr)
        tensors[name] = tensor.detach().contiguous().cpu()
    return tensors
