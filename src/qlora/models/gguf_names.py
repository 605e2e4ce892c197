"""Hugging Face -> GGUF tensor names and llama.cpp's query/key row permutation.

Shared by the merged-model export (`qlora.export.gguf_model`), the adapter export and the
loader of a GGUF's own blocks (``quant.kind: gguf``): all
must name a tensor exactly as llama.cpp's loader looks it up, and both must apply the same
permutation to the rows of q_proj / k_proj (a LoRA adapter: to the rows of B only; A's
columns index the input, which is not permuted).

Names come from the ``gguf`` package's own `gguf.TensorNameMap` (the table llama.cpp's
convert scripts use), so a name is never spelled here by hand.

Why the permutation: HF Llama applies rotary embeddings to the two *halves* of each head
(``rotate_half``), llama.cpp's ``llama`` architecture to *adjacent pairs*. llama.cpp's
converter reorders each head's rows of W_q and W_k so the same pairs rotate together:
within a head of ``d`` rows, row ``2*i + j`` of the result is row ``j * d/2 + i`` of the
input (i < d/2, j in {0, 1}). Qwen2 runs llama.cpp's ``qwen2`` architecture with NEOX-style
rope (halves, like HF), so it is not permuted.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import gguf
import torch

__all__ = [
    "ARCHITECTURES",
    "GGUFArch",
    "UnsupportedArchitectureError",
    "gguf_arch",
    "gguf_tensor_name",
    "permute_qk",
    "qk_heads",
    "tensor_name_map",
    "unpermute_qk",
]


class UnsupportedArchitectureError(ValueError):
    """The model's architecture has no GGUF mapping here; the message names the supported ones."""


@dataclass(frozen=True)
class GGUFArch:
    """How one transformers architecture is written for llama.cpp.

    Attributes:
        hf_name: the transformers class name (``config.architectures[0]``).
        name: llama.cpp's architecture (``general.architecture``; the key prefix).
        permute_qk: reorder q_proj/k_proj rows (and biases) to llama.cpp's rope layout.
    """

    hf_name: str
    name: str
    permute_qk: bool

    @property
    def model_arch(self) -> gguf.MODEL_ARCH:
        """The ``gguf`` package's enum for ``name``."""
        return next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == self.name)


ARCHITECTURES: dict[str, GGUFArch] = {
    a.hf_name: a
    for a in (
        GGUFArch("LlamaForCausalLM", "llama", permute_qk=True),
        GGUFArch("MistralForCausalLM", "llama", permute_qk=True),
        GGUFArch("Qwen2ForCausalLM", "qwen2", permute_qk=False),
    )
}


_MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}


def gguf_arch(model_or_config: object) -> GGUFArch:
    """The `GGUFArch` of a transformers model or config.

    The name is ``config.architectures[0]``; failing that the model's class name (a model
    converted from GGUF by transformers has no ``architectures``), or the config's
    ``model_type``.

    Raises:
        UnsupportedArchitectureError: not one of `ARCHITECTURES`.
    """
    config = getattr(model_or_config, "config", model_or_config)
    names = list(getattr(config, "architectures", None) or [])
    if names:
        name = names[0]
    elif config is not model_or_config:
        name = type(model_or_config).__name__
    else:
        model_type = str(getattr(config, "model_type", ""))
        name = _MODEL_TYPES.get(model_type, model_type or type(config).__name__)
    if name not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"architecture {name!r} cannot be exported to GGUF; supported: "
            f"{', '.join(ARCHITECTURES)}"
        )
    return ARCHITECTURES[name]


_SUFFIX = re.compile(r"\.(weight|bias)$")
_LAYER = re.compile(r"\.layers\.(\d+)\.")


@functools.cache
def tensor_name_map(arch: GGUFArch, n_layers: int) -> gguf.TensorNameMap:
    """The gguf package's HF -> llama.cpp name table (built once per architecture and depth:
    building it costs ~20 ms, and an export looks up every tensor)."""
    return gguf.TensorNameMap(arch.model_arch, n_layers)


def gguf_tensor_name(hf_name: str, arch: GGUFArch, n_layers: int) -> str:
    """llama.cpp's name for a HF tensor or module name.

    ``model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight``; a name without
    ``.weight`` / ``.bias`` (a module: ``model.layers.3.self_attn.q_proj``) -> ``blk.3.attn_q``
    (the adapter export appends ``.lora_a`` / ``.lora_b``). ``lm_head.weight`` ->
    ``output.weight``, ``model.embed_tokens.weight`` -> ``token_embd.weight``.

    Raises:
        UnsupportedArchitectureError: a tensor the architecture's GGUF has no place for.
    """
    names = tensor_name_map(arch, n_layers)
    suffix = _SUFFIX.search(hf_name)
    base = hf_name[: suffix.start()] if suffix else hf_name
    mapped = names.get_name(base)
    if mapped is None:
        raise UnsupportedArchitectureError(
            f"tensor {hf_name!r} of a {arch.hf_name} has no GGUF name for llama.cpp's "
            f"{arch.name!r} architecture"
        )
    return mapped + (suffix.group(0) if suffix else "")


def qk_heads(hf_name: str, arch: GGUFArch, n_head: int, n_head_kv: int) -> int | None:
    """The head count to permute ``hf_name``'s rows by, or None when it is not permuted.

    q_proj -> ``n_head``, k_proj -> ``n_head_kv`` (grouped-query attention), for
    architectures with ``permute_qk``; anything else -> None.
    """
    if not arch.permute_qk:
        return None
    if re.search(r"\.q_proj(\.|$)", hf_name):
        return n_head
    if re.search(r"\.k_proj(\.|$)", hf_name):
        return n_head_kv
    return None


def permute_qk(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rope layout -> llama.cpp's: reorder dim 0 of a q/k weight [out, ...] or bias [out].

    For a LoRA adapter pass B [out, r] (A is not permuted). Exact: a pure reindexing.
    """
    out = rows.shape[0]
    if out % (2 * n_head):
        raise ValueError(f"cannot permute {out} rows into {n_head} heads of even size")
    # [heads, 2 halves, d/2, ...] -> [heads, d/2, 2, ...]: halves become adjacent pairs
    split = rows.reshape(n_head, 2, out // n_head // 2, *rows.shape[1:])
    return split.transpose(1, 2).reshape(rows.shape)


def unpermute_qk(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of `permute_qk` (llama.cpp's layout -> HF's)."""
    out = rows.shape[0]
    if out % (2 * n_head):
        raise ValueError(f"cannot unpermute {out} rows from {n_head} heads of even size")
    split = rows.reshape(n_head, out // n_head // 2, 2, *rows.shape[1:])
    return split.transpose(1, 2).reshape(rows.shape)
