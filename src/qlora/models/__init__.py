"""Model loading: Hugging Face safetensors (sharded), bitsandbytes 4-bit, GGUF, named defaults."""

from qlora.models.export import save_quantized
from qlora.models.loader import LoadInfo, load_model, resolve_checkpoint
from qlora.models.registry import DEFAULT_MODEL, REGISTRY, ModelLoadError, cache_dir, gguf_to_hf

__all__ = [
    "DEFAULT_MODEL",
    "REGISTRY",
    "LoadInfo",
    "ModelLoadError",
    "cache_dir",
    "gguf_to_hf",
    "load_model",
    "resolve_checkpoint",
    "save_quantized",
]
