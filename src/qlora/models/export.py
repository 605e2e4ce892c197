"""Write a model with `QuantLinear` layers as a pre-quantized checkpoint directory.

nf4/fp4 models are written exactly as transformers + bitsandbytes write a 4-bit model:
``config.json`` with a ``quantization_config`` of ``quant_method: bitsandbytes`` and the
``Linear4bit`` tensors (``weight`` packed uint8, ``weight.absmax``, ``weight.quant_map``,
``weight.nested_*``, ``weight.quant_state.bitsandbytes__<kind>``), so
``AutoModelForCausalLM.from_pretrained(dir)`` with bitsandbytes installed loads it, and so
does `qlora.load_model` (byte for byte, nothing re-quantized). int8 and nf2, which
bitsandbytes does not have, use the same layout under ``quant_method: qlora``; only qlora
loads those.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qlora.models.safetensors_io import write_safetensors
from qlora.nn.qlinear import QuantLinear

__all__ = ["save_quantized"]

_BNB_KINDS = ("nf4", "fp4")


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
        "quant_method": "bitsandbytes" if kind in _BNB_KINDS else "qlora",
        "load_in_4bit": kind in _BNB_KINDS,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": kind,
        "bnb_4bit_use_double_quant": double_quant,
        "bnb_4bit_compute_dtype": compute,
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": skipped or None,
    }


def save_quantized(model: nn.Module, directory: str | os.PathLike, tokenizer: Any = None) -> Path:
    """Write ``model`` (with QuantLinear layers) and ``tokenizer`` to ``directory`` atomically.

    Returns:
        The directory. It is written into a temporary sibling and renamed into place, so an
        existing directory is replaced only once the new one is complete.
    """
    directory = Path(directory)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    if not layers:
        raise ValueError("the model has no quantized layers: load it with quant='nf4' (or fp4...)")
    config = model.config.to_dict()
    config["quantization_config"] = _quantization_config(layers, model)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        type(model.config).from_dict(config).save_pretrained(tmp)
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(tmp)
        seen: set[int] = set()
        tensors: dict[str, torch.Tensor] = {}
        for name, tensor in model.state_dict().items():
            ptr = tensor.untyped_storage().data_ptr()
            if ptr in seen and tensor.numel() > 1 and name.endswith(".weight"):
                continue  # a tied alias: transformers re-ties it from config on load
            seen.add(ptr)
            tensors[name] = tensor.detach().contiguous().cpu()
        write_safetensors(tmp / "model.safetensors", tensors, {"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory
