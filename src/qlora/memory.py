"""How much memory does a fine-tuning step need? Weights, adapters, gradients, optimizer
states, activations, the loss head's logits and backward working memory, in bytes.

    total = weights + adapters + gradients + optimizer + activations + logits + overhead

Everything but the last three terms is a parameter count times bytes per parameter (§7).
The activation terms are *derived*, op by op, from what autograd keeps alive between the
forward and the backward pass of a Llama-style decoder as `transformers` implements it, with
our `LoRALinear` and `QuantLinear`. The derivation is checked two ways: the tests sum the
bytes of every tensor autograd saves (``torch.autograd.graph.saved_tensors_hooks``) on a
small model, and ``benchmarks/check_memory.py`` measures the peak resident memory of real
training steps on SmolLM2-135M.

Notation
--------
b batch, s sequence length, T = b·s tokens; h hidden size, i MLP intermediate size,
n_q / n_kv query / key-value heads, d head dim, q = n_q·d, k = n_kv·d; V vocabulary,
L decoder layers, r LoRA rank; E experts and K of them active per token (MoE).
p = bytes of the compute dtype (4 for float32 on a CPU, 2 for bfloat16 on a GPU);
a = bytes of the adapter dtype (4: `LoRALinear` keeps adapters in float32);
m = bytes of a dropout mask (1 on CUDA, a on the CPU, see §1).

1. What survives from forward to backward
-----------------------------------------
Only tensors that some op *saves for backward* cost activation memory; every other
intermediate is freed as soon as the forward pass has used it. What an op saves depends on
which inputs need a gradient, because PyTorch's generated autograd code saves an operand only
when the other operand's gradient needs it:

* ``x @ Wᵀ`` (``nn.Linear``) saves x only if W trains, and W (a parameter: no new memory)
  only if x needs a gradient. So the frozen base layers of LoRA keep *no* activation.
  `QuantLinear`'s autograd function saves the packed weight (already resident) and never x.
* views, transposes, ``reshape`` of contiguous tensors, ``.to()``, ``cat``, ``+`` and
  multiplication by a Python scalar save nothing of size.
* ``a * b`` saves b if a needs a gradient and a if b does; ``silu(x)`` and ``pow(x, 2)`` save
  x; ``rsqrt``, ``softmax`` and ``log_softmax`` save their output.
* dropout saves its mask. On CUDA ``native_dropout`` keeps a bool mask (1 byte per element);
  on the CPU PyTorch multiplies by a noise tensor of the input's dtype and saves that.
* ``scaled_dot_product_attention`` with the flash / memory-efficient kernels (CUDA) and the
  CPU flash kernel saves q, k, v, its output and a float32 log-sum-exp [b, n_q, s]; never
  the [s × s] attention matrix. With ``enable_gqa`` (transformers passes it when there is no
  padding mask) k and v stay at n_kv heads; with a padding mask transformers repeats them
  to n_q heads first and the copies are what gets saved. The eager path saves the softmax
  probabilities [b, n_q, s, s] (float32, plus a copy in the compute dtype).

A tensor saved by several ops (the norm output read by q, k and v) is stored once: we count
storages, not saves. Also, the CPU flash kernel and the CUDA kernels allocate their output
in [b, s, n_q, d] order, so the ``transpose(1, 2).contiguous()`` that feeds ``o_proj`` is a
no-op and o_proj's input *is* the saved attention output.

2. One decoder layer with LoRA on every linear layer
----------------------------------------------------
``LoRALinear`` computes ``base(x) + B(A(dropout(x.to(float32)))) · α/r``. Per target with
input width n: A saves its input - the dropout output [T, n]·a when dropout > 0, else the
float32 cast [T, n]·a when the compute dtype is not float32, else x itself (shared with the
other targets reading x) - and B saves A's output [T, r]·a; dropout adds its mask
[T, n]·m (only if x needs a gradient). The layer, op by op:

====================================  ====================  ===================================
tensor                                saved by              bytes
====================================  ====================  ===================================
x, float32 (the residual stream)      input_layernorm pow,  T·h·4 (for p = 2 the ``.to(float32)``
                                      mul                   copy, for p = 4 the stream itself)
rsqrt(mean(x²) + ε)                   mul                   T·4
LoRA inputs of q, k, v (see above)    lora_A, dropout       3·T·h·(a + m) with dropout
A outputs of the 7 targets            lora_B                7·T·r·a
q, k after RoPE (new tensors)         SDPA                  T·(q + k)·p
v (the v_proj output, a view)         SDPA                  T·k·p
attention output                      SDPA, o_proj's A      T·q·p
log-sum-exp                           SDPA                  T·n_q·4
LoRA input of o_proj                  lora_A, dropout       T·q·(a + m) with dropout
x + attn, float32                     post_attention_ln     T·h·4 + T·4
LoRA inputs of gate, up               lora_A, dropout       2·T·h·(a + m) with dropout
g = gate(x)                           silu                  T·i·p
silu(g), up(x)                        the SwiGLU product    2·T·i·p
LoRA input of down_proj               lora_A, dropout       T·i·(a + m) with dropout
====================================  ====================  ===================================

RoPE saves only cos and sin (computed once per forward, [s, d]·p each, shared by all layers):
``q·cos + rotate_half(q)·sin`` multiplies by constants. Without dropout and with p = a,
the LoRA inputs collapse into three shared tensors (the two norm outputs T·h·p and the
SwiGLU product T·i·p). The first layer is cheaper: its input (the frozen embedding's
output) needs no gradient, so its norm saves nothing and its q/k/v dropouts keep no mask.

3. Full fine-tuning
-------------------
Every weight trains, so every Linear saves its input (the two norm outputs, the attention
output, the SwiGLU product: shared as above), each RMSNorm additionally saves its normalized
input for the weight gradient (T·h·p), there is no LoRA term, the embedding saves the token
ids and the output head saves the final norm output (T·h·p).

4. Gradient checkpointing
-------------------------
A checkpointed layer keeps only its input, T·h·p, and recomputes its activations during
backward. Live at the worst moment: one input per layer plus one layer's full activations
(§2; minus its input when p = 4, which *is* the kept checkpoint) while that layer's
backward runs.

5. The loss head
----------------
transformers computes ``logits = lm_head(norm(x))`` for all T tokens, upcasts them to
float32 and calls ``cross_entropy``: ``log_softmax`` saves its float32 output [T, V]·4. The
peak comes at the start of backward: ``nll_loss`` backward writes a dense [T, V] float32
gradient, and ``log_softmax``'s backward writes another while its saved output is still
alive - three [T, V] float32 tensors, 12·T·V bytes. (The logits themselves are gone by
then unless the caller holds the model output; keeping ``out = model(...)`` alive adds
T·V·p.) A chunked loss (our trainer) never forms them: it keeps the final hidden state
[T, h]·p and works on C tokens at a time, 3·C·V·4 bytes at its peak.

6. The peak
-----------
Backward frees saved tensors layer by layer, so the peak is the larger of two moments:

* loss backward: all saved layer activations (or the checkpoints) + the final norm's saves +
  the loss peak of §5;
* layer backward: the saved activations (or checkpoints + one recomputed layer) + the
  layer's backward working memory ("overhead"): the incoming gradient [T, h]·p and the two
  gradients of down_proj's input before they are summed, [T, i]·p from the frozen base and
  [T, i]·a from the adapter. This term is read off the order of the backward ops, not
  derived for every moment; against the allocator's own peak (``torch.profiler`` memory
  events) on SmolLM2-sized layers it is within 1 MiB. It is a small fraction of a layer.

The breakdown reports the terms at the larger moment. Gradients and optimizer states are
added in full: with a fused/per-tensor optimizer (no whole-model temporaries) and gradients
kept between steps this is exact; when gradients are freed between steps
(``zero_grad(set_to_none=True)``) it is an upper bound by the gradient bytes.

7. Parameters, gradients, optimizer states
------------------------------------------
* weights: the frozen base as stored. ``full-amp``: float32 master weights plus a 16-bit copy
  (6 B/param). ``full-16`` and ``lora-16``: 2 B/param. ``qlora-k``: every linear layer but
  the output head in k-bit blockwise storage, all scales and codebooks included - the bytes
  per element and per layer come from `qlora.quant.quantize` itself (NF4 + double
  quantization at blocksize 64: 4.127 bits/param); embeddings, norms and the output head stay
  16-bit. For an ``nn.Module`` the frozen tensors are counted at the dtype they have.
* adapters: r·(in + out) float32 parameters per adapted linear layer (all linear layers but
  the head; every expert's for MoE).
* gradients: one per trainable parameter in its dtype (float32 adapters and AMP master
  weights, 16-bit for ``full-16``).
* optimizer: ``adamw`` two states in the parameter's dtype (8 B/param for float32);
  ``adamw8bit`` two 8-bit states with a float32 absmax per 256 values (2.03 B/param);
  ``sgd`` none; ``paged_*`` the same bytes, but in CUDA unified memory that is evicted to
  the host under pressure, so they are reported as off-device and not in the total.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from qlora.config import ConfigError, LoraConfig

__all__ = [
    "COMPARE_SETTINGS",
    "METHODS",
    "OPTIMIZERS",
    "PUBLISHED_TABLE",
    "SIZES",
    "TABLE_SIZES",
    "Attention",
    "ComputeDtype",
    "Device",
    "MemoryEstimate",
    "Method",
    "ModelShape",
    "Optimizer",
    "SavedTensor",
    "compare_table",
    "estimate",
    "layer_saved_tensors",
    "model_shape",
    "quant_storage",
    "quantized_bytes",
    "sizes_table",
]

Method = Literal["full-amp", "full-16", "lora-16", "qlora-8", "qlora-4", "qlora-2"]
Optimizer = Literal["adamw", "adamw8bit", "sgd", "paged_adamw", "paged_adamw8bit"]
ComputeDtype = Literal["float32", "bfloat16", "float16"]
Device = Literal["cuda", "cpu"]
Attention = Literal["sdpa", "eager"]

METHODS: tuple[str, ...] = typing.get_args(Method)
OPTIMIZERS: tuple[str, ...] = typing.get_args(Optimizer)

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Which quantization kind stores the base for each QLoRA method (blocksize 64, double quant).
_QUANT_KIND = {"qlora-8": "int8", "qlora-4": "nf4", "qlora-2": "nf2"}
# bitsandbytes' blockwise 8-bit optimizers: one float32 absmax per 256 values.
_OPTIM8_BLOCK = 256
GiB = 2**30


@dataclass(frozen=True)
class ModelShape:
    """The shapes of a Llama-style decoder (dense or mixture-of-experts).

    Attributes:
        name: what the shape is (e.g. "Llama-2-7B").
        hidden: hidden size h.
        intermediate: MLP (per expert) intermediate size i.
        layers: decoder layers L.
        heads: query heads n_q.
        kv_heads: key/value heads n_kv (grouped-query attention when < heads).
        vocab: vocabulary size V.
        tied_embeddings: the output head shares the input embedding's weight.
        experts: experts per MoE layer (1: a dense MLP).
        active_experts: experts each token is routed to (top-K).
        head_dim: per-head size d; 0 means hidden // heads.
    """

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool = False
    experts: int = 1
    active_experts: int = 1
    head_dim: int = 0

    @property
    def d(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def q_dim(self) -> int:
        return self.heads * self.d

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.d

    @property
    def is_moe(self) -> bool:
        return self.experts > 1

    def layer_linears(self) -> list[tuple[str, int, int]]:
        """(name, in, out) of every linear layer of one decoder layer (experts unrolled)."""
        h, i = self.hidden, self.intermediate
        linears = [
            ("q_proj", h, self.q_dim),
            ("k_proj", h, self.kv_dim),
            ("v_proj", h, self.kv_dim),
            ("o_proj", self.q_dim, h),
        ]
        mlp = [("gate_proj", h, i), ("up_proj", h, i), ("down_proj", i, h)]
        if self.is_moe:
            linears.append(("router", h, self.experts))
            for e in range(self.experts):
                linears += [(f"experts.{e}.{n}", n_in, n_out) for n, n_in, n_out in mlp]
        else:
            linears += mlp
        return linears

    def linear_params(self) -> int:
        """Parameters in the decoder layers' linear layers (what QLoRA quantizes)."""
        return self.layers * sum(n_in * n_out for _, n_in, n_out in self.layer_linears())

    def other_params(self) -> int:
        """Embedding, output head (unless tied) and RMSNorm weights; biases are ignored."""
        embed = self.vocab * self.hidden
        head = 0 if self.tied_embeddings else self.vocab * self.hidden
        norms = (2 * self.layers + 1) * self.hidden
        return embed + head + norms

    def params(self) -> int:
        return self.linear_params() + self.other_params()

    def lora_params(self, rank: int) -> int:
        """r·(in + out) per adapted linear layer: all of them but the output head."""
        return self.layers * sum(rank * (n_in + n_out) for _, n_in, n_out in self.layer_linears())

    @classmethod
    def from_config(cls, config: dict[str, Any], name: str = "config") -> ModelShape:
        """Read a Hugging Face ``config.json`` mapping (``text_config`` of multimodal ones)."""
        if isinstance(config.get("text_config"), dict):
            config = config["text_config"]
        required = (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "vocab_size",
        )
        missing = [key for key in required if config.get(key) is None]
        if missing:
            raise ConfigError(
                f"{name}: missing {', '.join(missing)}; a Llama-style config.json needs "
                f"{', '.join(required)}"
            )
        heads = int(config["num_attention_heads"])
        experts = config.get("num_local_experts") or config.get("num_experts") or 1
        return cls(
            name=str(config.get("_name_or_path") or config.get("model_type") or name),
            hidden=int(config["hidden_size"]),
            intermediate=int(config["intermediate_size"]),
            layers=int(config["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            vocab=int(config["vocab_size"]),
            tied_embeddings=bool(config.get("tie_word_embeddings", False)),
            experts=int(experts),
            active_experts=int(config.get("num_experts_per_tok") or 1) if experts > 1 else 1,
            head_dim=int(config.get("head_dim") or 0),
        )


# Published architecture shapes (the models' config.json files).
_LLAMA1_33B = ModelShape('LLaMA-33B ("30B")', 6656, 17920, 60, 52, 52, 32000)
SIZES: dict[str, ModelShape] = {
    "135m": ModelShape("SmolLM2-135M", 576, 1536, 30, 9, 3, 49152, tied_embeddings=True),
    "360m": ModelShape("SmolLM2-360M", 960, 2560, 32, 15, 5, 49152, tied_embeddings=True),
    "1.7b": ModelShape("SmolLM2-1.7B", 2048, 8192, 24, 32, 32, 49152, tied_embeddings=True),
    "7b": ModelShape("Llama-2-7B", 4096, 11008, 32, 32, 32, 32000),
    "8b": ModelShape("Llama-3-8B", 4096, 14336, 32, 32, 8, 128256),
    "13b": ModelShape("Llama-2-13B", 5120, 13824, 40, 40, 40, 32000),
    "30b": _LLAMA1_33B,
    "33b": _LLAMA1_33B,
    "65b": ModelShape("LLaMA-65B", 8192, 22016, 80, 64, 64, 32000),
    "70b": ModelShape("Llama-2-70B", 8192, 28672, 80, 64, 8, 32000),
    "110b": ModelShape("Qwen1.5-110B", 8192, 49152, 80, 64, 8, 152064),
    "8x7b": ModelShape("Mixtral-8x7B", 4096, 14336, 32, 32, 8, 32000, experts=8, active_experts=2),
    "8x22b": ModelShape(
        "Mixtral-8x22B", 6144, 16384, 56, 48, 8, 32768, experts=8, active_experts=2
    ),
}
TABLE_SIZES: tuple[str, ...] = ("7b", "13b", "30b", "70b", "110b", "8x7b", "8x22b")

# The rule-of-thumb table of fine-tuning memory (GB) circulated with LLaMA-Factory's README.
PUBLISHED_TABLE: dict[str, dict[str, float]] = {
    "full-amp": dict(zip(TABLE_SIZES, (120, 240, 600, 1200, 2000, 900, 2400), strict=True)),
    "full-16": dict(zip(TABLE_SIZES, (60, 120, 300, 600, 900, 400, 1200), strict=True)),
    "lora-16": dict(zip(TABLE_SIZES, (16, 32, 64, 160, 240, 120, 320), strict=True)),
    "qlora-8": dict(zip(TABLE_SIZES, (10, 20, 40, 80, 140, 60, 160), strict=True)),
    "qlora-4": dict(zip(TABLE_SIZES, (6, 12, 24, 48, 72, 30, 96), strict=True)),
    "qlora-2": dict(zip(TABLE_SIZES, (4, 8, 16, 24, 48, 18, 48), strict=True)),
}
# The documented settings for comparing with PUBLISHED_TABLE (see docs/memory.md).
COMPARE_SETTINGS: dict[str, Any] = {
    "batch": 1,
    "seq_len": 512,
    "rank": 16,
    "optimizer": "adamw",
    "device": "cuda",
    "compute_dtype": "bfloat16",
    "chunked_loss": False,
}


@functools.cache
def _sample_state(kind: str, blocksize: int, double_quant: bool) -> Any:
    """A small QuantState: the element sizes and block sizes of ``kind``'s storage format."""
    from qlora.quant import quantize

    return quantize(torch.linspace(-1, 1, blocksize * 4), kind, blocksize, double_quant)


def quantized_bytes(numel: int, kind: str, blocksize: int = 64, double_quant: bool = True) -> int:
    """Bytes `qlora.quant.quantize` stores for a tensor of ``numel`` elements, exactly.

    The layout is read off a sample state from the library rather than written down: packed
    codes (8 // bits per byte), one absmax per block (uint8 with double quantization, else
    float32), nested float32 absmax per ``nested.blocksize`` blocks, the codebooks and the
    double-quant offset.
    """
    state = _sample_state(kind, blocksize, double_quant)
    per_byte = 8 // state.bits
    blocks = -(-numel // blocksize)
    total = -(-numel // per_byte) * state.packed.element_size()
    total += blocks * state.absmax.element_size() + state.code.numel() * state.code.element_size()
    nested = state.nested
    if nested is not None:
        total += -(-blocks // nested.blocksize) * nested.absmax.element_size()
        total += nested.code.numel() * nested.code.element_size()
        total += nested.offset.numel() * nested.offset.element_size()
    return int(total)


def quant_storage(kind: str, blocksize: int = 64, double_quant: bool = True) -> tuple[float, int]:
    """``(bytes per element, bytes per tensor)`` of k-bit storage for large tensors.

    8 x the first is the familiar bits/param (NF4 + double quantization at blocksize 64:
    4.127); the second is the per-tensor constant (codebooks, offset).
    """
    unit = blocksize * 256  # one nested block of absmax values: no partial blocks
    small = quantized_bytes(2 * unit, kind, blocksize, double_quant)
    large = quantized_bytes(4 * unit, kind, blocksize, double_quant)
    per_element = (large - small) / (2 * unit)
    return per_element, round(small - per_element * 2 * unit)


@dataclass(frozen=True)
class SavedTensor:
    """One tensor alive between forward and backward (or at the peak of backward).

    Attributes:
        name: what it is.
        saved_by: the op(s) that keep it.
        shape: symbolic shape and element size, e.g. "[T, h]·4".
        nbytes: bytes.
    """

    name: str
    saved_by: str
    shape: str
    nbytes: int


class _Saved:
    """Collects SavedTensor entries; a shared tensor (key) is counted once."""

    def __init__(self) -> None:
        self.items: list[SavedTensor] = []
        self._keys: set[str] = set()

    def add(self, name: str, saved_by: str, shape: str, nbytes: int, key: str = "") -> None:
        if key:
            if key in self._keys:
                return
            self._keys.add(key)
        self.items.append(SavedTensor(name, saved_by, shape, int(nbytes)))


@dataclass(frozen=True)
class _Run:
    """Settings the activation derivation depends on."""

    tokens: int
    seq_len: int
    batch: int
    lora: bool  # False: full fine-tuning
    rank: int
    dropout: bool
    p: int  # compute dtype bytes
    a: int  # adapter dtype bytes
    m: int  # dropout mask bytes
    attention: str


def layer_saved_tensors(
    shape: ModelShape,
    *,
    batch: int,
    seq_len: int,
    method: Method = "qlora-4",
    rank: int = 16,
    lora_dropout: float = 0.05,
    compute_dtype: ComputeDtype = "bfloat16",
    device: Device = "cuda",
    attention: Attention = "sdpa",
    input_requires_grad: bool = True,
) -> list[SavedTensor]:
    """The tensors one decoder layer saves for backward (module docstring §2-§3).

    Args:
        shape: the architecture.
        batch, seq_len: T = batch·seq_len tokens.
        method: full fine-tuning or (Q)LoRA (which tensors need gradients).
        rank, lora_dropout: the adapters (ignored for full fine-tuning).
        compute_dtype, device: element sizes of activations and dropout masks.
        attention: "sdpa" (flash-style kernels) or "eager".
        input_requires_grad: False for the first layer under LoRA without checkpointing.
    """
    run = _make_run(batch, seq_len, method, rank, lora_dropout, compute_dtype, device, attention)
    return _layer(shape, run, input_requires_grad).items


def _make_run(
    batch: int,
    seq_len: int,
    method: str,
    rank: int,
    lora_dropout: float,
    compute_dtype: str,
    device: str,
    attention: str,
) -> _Run:
    lora = not method.startswith("full")
    adapter_bytes = 4
    return _Run(
        tokens=batch * seq_len,
        seq_len=seq_len,
        batch=batch,
        lora=lora,
        rank=rank,
        dropout=lora and lora_dropout > 0,
        p=_DTYPE_BYTES[compute_dtype],
        a=adapter_bytes,
        # CUDA's fused dropout keeps a bool mask; the CPU fallback a noise tensor of the
        # (float32, adapter-dtype) input's dtype.
        m=1 if device == "cuda" else adapter_bytes,
        attention=attention,
    )


def _linear_input(
    saved: _Saved,
    run: _Run,
    target: str,
    n_in: int,
    tokens: int,
    x_key: str,
    x_name: str,
    x_requires_grad: bool = True,
) -> None:
    """What one linear layer keeps of its input x [tokens, n_in] (module docstring §2-§3)."""
    dims = "T·K" if tokens != run.tokens else "T"
    if not run.lora:  # the weight trains: x is saved (shared by all readers of x)
        saved.add(
            x_name,
            f"{target} (weight grad)",
            f"[{dims}, {n_in}]·{run.p}",
            tokens * n_in * run.p,
            key=x_key,
        )
        return
    if run.dropout:
        if x_requires_grad:
            saved.add(
                f"{target} dropout mask",
                f"{target} dropout",
                f"[{dims}, {n_in}]·{run.m}",
                tokens * n_in * run.m,
            )
        saved.add(
            f"{target} dropout output",
            f"{target} lora_A",
            f"[{dims}, {n_in}]·{run.a}",
            tokens * n_in * run.a,
        )
    elif run.p != run.a:  # LoRALinear casts x to the adapter dtype, one copy per target
        saved.add(
            f"{target} input cast to float32",
            f"{target} lora_A",
            f"[{dims}, {n_in}]·{run.a}",
            tokens * n_in * run.a,
        )
    else:
        saved.add(
            x_name,
            f"{target} lora_A",
            f"[{dims}, {n_in}]·{run.p}",
            tokens * n_in * run.p,
            key=x_key,
        )
    saved.add(
        f"{target} lora_A output",
        f"{target} lora_B",
        f"[{dims}, r]·{run.a}",
        tokens * run.rank * run.a,
    )


def _layer(shape: ModelShape, run: _Run, input_requires_grad: bool) -> _Saved:
    """Saved tensors of one decoder layer; see the module docstring for the derivation."""
    saved = _Saved()
    t, h, i, p = run.tokens, shape.hidden, shape.intermediate, run.p
    qd, kd = shape.q_dim, shape.kv_dim
    full = not run.lora

    # input_layernorm: x.to(float32) (the stream itself when p = 4) is saved by pow and by
    # the normalizing mul; rsqrt saves its output. Nothing if x needs no gradient.
    if input_requires_grad:
        saved.add("input_layernorm: x in float32", "pow, mul", "[T, h]·4", t * h * 4)
        saved.add("input_layernorm: rsqrt", "mul", "[T, 1]·4", t * 4)
    if full:  # the norm weight trains: weight * normed saves normed
        saved.add("input_layernorm: normed", "weight mul", f"[T, h]·{p}", t * h * p)
    for proj in ("q_proj", "k_proj", "v_proj"):
        _linear_input(
            saved,
            run,
            proj,
            h,
            t,
            "n1",
            "input_layernorm output",
            x_requires_grad=input_requires_grad,
        )

    # attention: RoPE saves only the shared cos/sin; the kernel saves q, k, v, out, lse.
    groups = shape.heads // shape.kv_heads
    if run.attention == "eager":
        k_saved = qd if groups > 1 else kd  # repeat_kv copies
        saved.add("q after RoPE", "q @ kᵀ", f"[T, q]·{p}", t * qd * p)
        saved.add("k after RoPE (repeated to n_q heads)", "q @ kᵀ", "[T, q or k]", t * k_saved * p)
        saved.add("v (repeated to n_q heads)", "probs @ v", "[T, q or k]", t * k_saved * p)
        probs = run.batch * shape.heads * run.seq_len * run.seq_len
        saved.add("attention probabilities, float32", "softmax", "[b, n_q, s, s]·4", probs * 4)
        if p != 4:
            saved.add(
                "attention probabilities, compute dtype",
                "probs @ v",
                f"[b, n_q, s, s]·{p}",
                probs * p,
            )
        # The output (a new contiguous tensor) is kept only by o_proj, if at all (below).
    else:
        saved.add("q after RoPE", "SDPA", f"[T, q]·{p}", t * qd * p)
        saved.add("k after RoPE", "SDPA", f"[T, k]·{p}", t * kd * p)
        saved.add("v (v_proj output)", "SDPA", f"[T, k]·{p}", t * kd * p)
        saved.add("attention output", "SDPA", f"[T, q]·{p}", t * qd * p, key="attn")
        saved.add("log-sum-exp", "SDPA", "[b, n_q, s]·4", t * shape.heads * 4)
    _linear_input(saved, run, "o_proj", qd, t, "attn", "attention output")

    # post_attention_layernorm (the residual sum always needs a gradient here)
    saved.add("post_attention_layernorm: x in float32", "pow, mul", "[T, h]·4", t * h * 4)
    saved.add("post_attention_layernorm: rsqrt", "mul", "[T, 1]·4", t * 4)
    if full:
        saved.add("post_attention_layernorm: normed", "weight mul", f"[T, h]·{p}", t * h * p)

    if shape.is_moe:
        _moe_mlp(saved, shape, run)
    else:
        for proj in ("gate_proj", "up_proj"):
            _linear_input(saved, run, proj, h, t, "n2", "post_attention_layernorm output")
        saved.add("g = gate_proj(x)", "silu", f"[T, i]·{p}", t * i * p)
        saved.add("silu(g)", "SwiGLU mul", f"[T, i]·{p}", t * i * p)
        saved.add("up_proj(x)", "SwiGLU mul", f"[T, i]·{p}", t * i * p)
        _linear_input(saved, run, "down_proj", i, t, "prod", "silu(g)·up")
    return saved


def _moe_mlp(saved: _Saved, shape: ModelShape, run: _Run) -> None:
    """Mixtral-style sparse MLP: a router, then K experts per token (derived, not measured).

    Each expert gathers its tokens (``x[idx]``, a copy), runs the SwiGLU MLP on them and
    its output is scaled by the routing weight (a mul that saves both). Over all experts that
    is the dense MLP's tensors for T·K tokens, plus the gathered inputs and outputs.
    """
    t, h, i, p, k = run.tokens, shape.hidden, shape.intermediate, run.p, shape.active_experts
    tk = t * k
    _linear_input(saved, run, "router", h, t, "n2", "post_attention_layernorm output")
    saved.add("router probabilities, float32", "softmax", "[T, E]·4", t * shape.experts * 4)
    for proj in ("gate_proj", "up_proj"):
        _linear_input(saved, run, f"experts' {proj}", h, tk, "gathered", "gathered expert inputs")
    saved.add("g = gate_proj(x)", "silu", f"[T·K, i]·{p}", tk * i * p)
    saved.add("silu(g)", "SwiGLU mul", f"[T·K, i]·{p}", tk * i * p)
    saved.add("up_proj(x)", "SwiGLU mul", f"[T·K, i]·{p}", tk * i * p)
    _linear_input(saved, run, "experts' down_proj", i, tk, "prod", "silu(g)·up")
    saved.add("expert outputs", "routing-weight mul", f"[T·K, h]·{p}", tk * h * p)
    saved.add("routing weights", "routing-weight mul", f"[T·K, 1]·{p}", tk * p)


def _sum(items: Iterable[SavedTensor]) -> int:
    return sum(item.nbytes for item in items)


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak memory of one fine-tuning step, in bytes (see the module docstring).

    The seven terms add up to `total`; ``offloaded`` (paged optimizer states) is not in it.
    """

    model: str
    method: Method
    batch: int
    seq_len: int
    rank: int
    optimizer: Optimizer
    grad_ckpt: bool
    compute_dtype: ComputeDtype
    device: Device
    chunked_loss: bool
    params: int
    trainable_params: int
    weights: int
    adapters: int
    gradients: int
    optimizer_states: int
    activations: int
    logits: int
    overhead: int
    offloaded: int = 0
    peak_phase: str = ""
    saved_for_backward: int = 0
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def total(self) -> int:
        return (
            self.weights
            + self.adapters
            + self.gradients
            + self.optimizer_states
            + self.activations
            + self.logits
            + self.overhead
        )

    def rows(self) -> list[tuple[str, int]]:
        """(label, bytes) of the breakdown, total last."""
        rows = [
            ("weights", self.weights),
            ("adapters", self.adapters),
            ("gradients", self.gradients),
            ("optimizer states", self.optimizer_states),
            ("activations", self.activations),
            ("logits / loss", self.logits),
            ("overhead", self.overhead),
            ("total", self.total),
        ]
        if self.offloaded:
            rows.append(("paged optimizer (off-device)", self.offloaded))
        return rows

    def __str__(self) -> str:
        ckpt = "gradient checkpointing" if self.grad_ckpt else "no gradient checkpointing"
        loss = "chunked loss" if self.chunked_loss else "full logits"
        lines = [
            f"{self.model}: {self.method}, {self.params / 1e9:.3g}B params "
            f"({self.trainable_params / 1e6:.4g}M trainable)",
            f"batch {self.batch} x seq {self.seq_len}, r={self.rank}, {self.optimizer}, {ckpt}, "
            f"{self.compute_dtype} compute on {self.device}, {loss}",
        ]
        width = max(len(label) for label, _ in self.rows())
        for label, nbytes in self.rows():
            lines.append(f"  {label:<{width}}  {nbytes / GiB:10.3f} GiB")
        if self.peak_phase:
            lines.append(f"  peak during: {self.peak_phase}")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


# -- inputs --------------------------------------------------------------------------------


def _choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(
            f"{name}={value!r} is not valid; choose one of {', '.join(map(repr, choices))}"
        )


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


def model_shape(model: str | os.PathLike[str] | ModelShape | nn.Module) -> ModelShape:
    """The architecture of ``model``: a size ("7b", "8x7b", ...), a ``config.json`` (or a
    directory holding one), a `ModelShape`, or a module (its ``config``, else its layers).

    Raises:
        ConfigError: unknown size, missing or unreadable config.json, or a module whose shapes
            cannot be inferred; the message names the value and the valid choices.
    """
    if isinstance(model, ModelShape):
        return model
    if isinstance(model, nn.Module):
        return _module_shape(model)
    text = os.fspath(model)
    if text.lower() in SIZES:
        return SIZES[text.lower()]
    path = Path(text)
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path.parent}: no config.json in this directory")
    if not path.is_file():
        raise ConfigError(
            f"unknown model {text!r}: not a size ({', '.join(SIZES)}) "
            "nor an existing config.json or model directory"
        )
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: cannot read it as JSON ({err})") from err
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return ModelShape.from_config(config, name=str(path))


def _module_shape(model: nn.Module) -> ModelShape:
    config = getattr(model, "config", None)
    if config is not None:
        values = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
        shape = ModelShape.from_config(values, name=type(model).__name__)
        return dataclasses.replace(shape, name=str(values.get("_name_or_path") or shape.name))
    # No config: read the Llama-style module names. Heads are not recoverable from weights;
    # 64-wide heads are assumed (only the log-sum-exp term depends on them).
    first: dict[str, nn.Module] = {}
    layers = 0
    embedding = None
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "q_proj":
            layers += 1
        if leaf in ("q_proj", "k_proj", "gate_proj") and leaf not in first:
            first[leaf] = module
        if isinstance(module, nn.Embedding) and embedding is None:
            embedding = module
    if not layers or embedding is None or len(first) < 3:
        raise ConfigError(
            f"cannot infer the architecture of {type(model).__name__}: it has no .config and "
            "no Llama-style q_proj/k_proj/gate_proj layers; pass a config.json or a size"
        )
    hidden = int(first["q_proj"].in_features)
    heads = max(1, int(first["q_proj"].out_features) // 64)
    head = getattr(model, "get_output_embeddings", lambda: None)()
    return ModelShape(
        name=type(model).__name__,
        hidden=hidden,
        intermediate=int(first["gate_proj"].out_features),
        layers=layers,
        heads=heads,
        kv_heads=max(1, int(first["k_proj"].out_features) // 64),
        vocab=int(embedding.num_embeddings),
        tied_embeddings=head is not None and head.weight is embedding.weight,
        head_dim=64,
    )


@dataclass
class _Params:
    """Parameter inventory: counts and bytes of what is stored and what trains."""

    total: int  # base-model parameters (quantized weights counted unpacked; no adapters)
    trainable: int
    frozen_bytes: int  # the base as stored
    trainable_dtype_bytes: float  # bytes per trainable parameter (its dtype)
    notes: list[str]


def _shape_params(shape: ModelShape, method: str, rank: int) -> _Params:
    linear = shape.linear_params()
    other = shape.other_params()
    total = linear + other
    if method == "full-amp":
        return _Params(total, total, total * (4 + 2), 4, [])
    if method == "full-16":
        return _Params(total, total, total * 2, 2, [])
    adapters = shape.lora_params(rank)
    if method == "lora-16":
        return _Params(total, adapters, total * 2, 4, [])
    kind = _QUANT_KIND[method]
    per_layer = sum(quantized_bytes(n_in * n_out, kind) for _, n_in, n_out in shape.layer_linears())
    stored = shape.layers * per_layer + other * 2
    return _Params(total, adapters, stored, 4, [])


def _module_params(model: nn.Module, method: str, rank: int) -> tuple[_Params, int, float]:
    """Inventory of a real module; also returns the LoRA rank and dropout found in it."""
    from qlora.nn.inject import find_targets
    from qlora.nn.lora import LoRALinear
    from qlora.nn.qlinear import QuantLinear

    lora_layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    quantized = [m for m in model.modules() if isinstance(m, QuantLinear)]
    notes: list[str] = []
    if method.startswith("full") and (lora_layers or quantized):
        raise ConfigError(
            f"method={method!r} needs a plain model, but this one already has "
            f"{'LoRA adapters' if lora_layers else 'quantized layers'}; use a lora/qlora method"
        )
    adapter_ids: set[int] = set()
    found_rank, found_dropout = rank, -1.0
    for layer in lora_layers:
        for name in layer.active_adapters:
            adapter_ids.update(id(t) for t in layer.lora_A[name].parameters())
            adapter_ids.update(id(t) for t in layer.lora_B[name].parameters())
            found_rank = int(layer.lora_A[name].out_features)
            drop = layer.lora_dropout[name]
            found_dropout = float(drop.p) if isinstance(drop, nn.Dropout) else 0.0
    # Parameters and buffers once each (tied weights share storage), by storage address.
    seen: set[int] = set()
    frozen_bytes = trainable = total = 0
    trainable_bytes = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        key = tensor.untyped_storage().data_ptr()
        if key in seen and key != 0:
            continue
        seen.add(key)
        nbytes = tensor.numel() * tensor.element_size()
        if id(tensor) in adapter_ids:
            trainable += tensor.numel()
            trainable_bytes += nbytes
            continue
        # Every other parameter and buffer is resident: QuantLinear's packed codes and
        # scales (uint8/float32 buffers), rotary frequencies, inactive adapters.
        frozen_bytes += nbytes
        if isinstance(tensor, nn.Parameter):
            total += tensor.numel()
    # A QuantLinear's weight is a buffer: count its logical out x in as parameters.
    for layer in quantized:
        total += layer.out_features * layer.in_features
    # What quantize_model / add_lora would still do to this module for `method`.
    targets = [model.get_submodule(n) for n in find_targets(model, "all-linear")]
    if method in _QUANT_KIND:
        for layer in targets:
            base = layer.base_layer if isinstance(layer, LoRALinear) else layer
            if isinstance(base, nn.Linear):
                numel = base.weight.numel()
                frozen_bytes += quantized_bytes(numel, _QUANT_KIND[method])
                frozen_bytes -= numel * base.weight.element_size()
    if method.startswith("full"):
        trainable = total
        dtype_bytes = max(
            (p.element_size() for p in model.parameters() if p.is_floating_point()), default=2
        )
        if method == "full-amp":
            frozen_bytes = total * (4 + 2)
            dtype_bytes = 4
        return _Params(total, trainable, frozen_bytes, dtype_bytes, notes), rank, -1.0
    if not lora_layers:
        trainable = sum(rank * (t.in_features + t.out_features) for t in targets)
        trainable_bytes = 4 * trainable
    else:
        notes.append(f"adapters as found in the model (r={found_rank})")
    dtype_bytes = trainable_bytes / trainable if trainable else 4.0
    params = _Params(total, trainable, frozen_bytes, dtype_bytes, notes)
    return params, found_rank, found_dropout


def _module_defaults(model: nn.Module) -> tuple[str, str, str]:
    """(compute dtype, device, attention implementation) a module will train with."""
    from qlora.nn.qlinear import QuantLinear

    names = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
    dtype = None
    for module in model.modules():
        if isinstance(module, QuantLinear):
            dtype = module.compute_dtype
            break
    tensors = [p for p in model.parameters() if p.is_floating_point()]
    if dtype is None:
        dtype = tensors[0].dtype if tensors else torch.float32
    device = "cuda" if tensors and tensors[0].device.type == "cuda" else "cpu"
    config = getattr(model, "config", None)
    attention = getattr(config, "_attn_implementation", None) or "sdpa"
    return names.get(dtype, "float32"), device, "eager" if attention == "eager" else "sdpa"


# -- the estimate --------------------------------------------------------------------------


def estimate(
    model: str | os.PathLike[str] | ModelShape | nn.Module,
    method: Method = "qlora-4",
    *,
    batch: int = 1,
    seq_len: int = 512,
    rank: int | None = None,
    optimizer: Optimizer = "adamw",
    grad_ckpt: bool = False,
    compute_dtype: ComputeDtype | None = None,
    device: Device | None = None,
    chunked_loss: bool = True,
    lora_dropout: float | None = None,
    attention: Attention | None = None,
    loss_chunk_tokens: int = 1024,
) -> MemoryEstimate:
    """Estimate the peak memory of one fine-tuning step.

    Args:
        model: a size ("135m", "7b", "13b", "30b", "70b", "110b", "8x7b", "8x22b", ... see
            `SIZES`), a path to a ``config.json`` or a model directory, a `ModelShape`, or
            a loaded ``nn.Module`` (its real parameters and buffers are counted, QuantLinear's
            packed weights included; adapters already in it are taken as they are).
        method: "full-amp", "full-16", "lora-16", "qlora-8", "qlora-4" or "qlora-2".
        batch, seq_len: sequences per step and tokens per sequence.
        rank: LoRA rank (default `LoraConfig`'s); ignored for full fine-tuning.
        optimizer: "adamw", "adamw8bit", "sgd", "paged_adamw" or "paged_adamw8bit".
        grad_ckpt: gradient checkpointing of every decoder layer.
        compute_dtype: dtype of the activations; default bfloat16 on CUDA, float32 on the
            CPU (for a module: its QuantLinear compute dtype, else its parameters' dtype).
        device: "cuda" or "cpu" (dropout masks differ; paged states only page off CUDA);
            default "cuda", or where the module's parameters are.
        chunked_loss: the loss never forms full [T, V] float32 logits (our trainer); False
            for transformers' ``model(ids, labels=...)`` loss.
        lora_dropout: adapter dropout (default `LoraConfig`'s; for a module with adapters,
            theirs).
        attention: "sdpa" or "eager" (default: the module's configured implementation, else
            "sdpa").
        loss_chunk_tokens: tokens per chunk of the chunked loss.

    Returns:
        A `MemoryEstimate`; ``print`` it for a breakdown in GiB.

    Raises:
        ConfigError: an unknown size, method, optimizer or dtype, a missing config.json, or
            a non-positive batch/seq_len/rank; the message lists the valid choices.
    """
    _choice("method", method, METHODS)
    _choice("optimizer", optimizer, OPTIMIZERS)
    _positive("batch", batch)
    _positive("seq_len", seq_len)
    defaults = LoraConfig()
    rank = defaults.r if rank is None else _positive("rank", rank)
    lora_dropout = defaults.dropout if lora_dropout is None else float(lora_dropout)
    shape = model_shape(model)
    notes: list[str] = []

    if isinstance(model, nn.Module):
        params, found_rank, found_dropout = _module_params(model, method, rank)
        rank = found_rank
        lora_dropout = found_dropout if found_dropout >= 0 else lora_dropout
        module_dtype, module_device, module_attention = _module_defaults(model)
        compute_dtype = compute_dtype or module_dtype  # type: ignore[assignment]
        device = device or module_device  # type: ignore[assignment]
        attention = attention or module_attention  # type: ignore[assignment]
        name = shape.name
    else:
        params = _shape_params(shape, method, rank)
        device = device or "cuda"
        compute_dtype = compute_dtype or ("bfloat16" if device == "cuda" else "float32")
        attention = attention or "sdpa"
        name = shape.name
    _choice("device", device, typing.get_args(Device))
    _choice("compute_dtype", compute_dtype, typing.get_args(ComputeDtype))
    _choice("attention", attention, typing.get_args(Attention))
    notes += params.notes
    assert device is not None and compute_dtype is not None and attention is not None

    # Parameters, gradients, optimizer states (§7).
    lora = not method.startswith("full")
    adapters = math.ceil(params.trainable * params.trainable_dtype_bytes) if lora else 0
    gradients = math.ceil(params.trainable * params.trainable_dtype_bytes)
    if optimizer.endswith("adamw"):
        states = math.ceil(2 * params.trainable * params.trainable_dtype_bytes)
    elif optimizer.endswith("adamw8bit"):
        states = math.ceil(2 * params.trainable * (1 + 4 / _OPTIM8_BLOCK))
    else:
        states = 0
    offloaded = 0
    if optimizer.startswith("paged_"):
        if device == "cuda":
            offloaded, states = states, 0
            notes.append(
                f"{optimizer}: {offloaded / GiB:.3g} GiB of optimizer states live in paged "
                "(unified) memory, evicted to the host under pressure: not in the total"
            )
        else:
            notes.append(f"{optimizer}: on the CPU paged memory is host memory: counted")

    # Activations, logits, backward working memory (§2-§6).
    run = _make_run(batch, seq_len, method, rank, lora_dropout, compute_dtype, device, attention)
    p, t = run.p, run.tokens
    layer = _sum(_layer(shape, run, input_requires_grad=True).items)
    # Without checkpointing, the first layer's input (a frozen embedding's output) needs no
    # gradient under LoRA; with it, transformers makes the embedding output require grad.
    first_needs_grad = (not lora) or grad_ckpt
    first = _sum(_layer(shape, run, input_requires_grad=first_needs_grad).items)
    rope = 2 * seq_len * shape.d * p  # cos, sin: shared by all layers
    final_norm = t * shape.hidden * 4 + t * 4
    model_saved = rope + final_norm
    if not lora:
        ids = 8 * t  # the embedding saves the token ids
        model_saved += ids + 2 * t * shape.hidden * p  # final norm's normed + lm_head input
    if chunked_loss:
        chunk = min(t, loss_chunk_tokens)
        loss_saved = t * shape.hidden * p  # the final hidden state, kept for recomputation
        loss_peak = loss_saved + 3 * chunk * shape.vocab * 4
    else:
        loss_saved = t * shape.vocab * 4 + 8 * t  # log_softmax output, targets
        loss_peak = 3 * t * shape.vocab * 4 + 8 * t
    # Backward working memory of one layer: the incoming gradient [T, h] and the two
    # gradients of down_proj's input (base path in the compute dtype, adapter path in the
    # adapter dtype) before they are summed.
    workspace = t * shape.hidden * p + t * shape.intermediate * (p + (run.a if lora else p))

    if grad_ckpt:
        kept = shape.layers * t * shape.hidden * p
        recompute = layer - (t * shape.hidden * 4 if p == 4 else 0)
        loss_phase = (kept + model_saved, loss_peak, 0)
        layer_phase = (kept + rope + recompute, 0, workspace)
        saved_total = kept + model_saved + loss_saved
    else:
        stack = first + (shape.layers - 1) * layer
        loss_phase = (stack + model_saved, loss_peak, 0)
        layer_phase = (stack + rope, 0, workspace)
        saved_total = stack + model_saved + loss_saved
    if sum(loss_phase) >= sum(layer_phase):
        activations, logits, overhead = loss_phase
        phase = "loss backward (logits, log-softmax and their gradients)"
    else:
        activations, logits, overhead = layer_phase
        phase = "a decoder layer's backward" + (" (recomputed)" if grad_ckpt else "")
    if shape.is_moe:
        notes.append("MoE activations are derived, not measured (experts as separate MLPs)")
    if device == "cpu":
        notes.append(
            "CPU: live tensor memory; with glibc's default malloc, peak RSS can be 1.4-2.7x "
            "this - set MALLOC_MMAP_THRESHOLD_=131072 (docs/memory.md)"
        )

    return MemoryEstimate(
        model=name,
        method=method,
        batch=batch,
        seq_len=seq_len,
        rank=rank,
        optimizer=optimizer,
        grad_ckpt=grad_ckpt,
        compute_dtype=compute_dtype,
        device=device,
        chunked_loss=chunked_loss,
        params=params.total,
        trainable_params=params.trainable,
        weights=params.frozen_bytes,
        adapters=adapters,
        gradients=gradients,
        optimizer_states=states,
        activations=activations,
        logits=logits,
        overhead=overhead,
        offloaded=offloaded,
        peak_phase=phase,
        saved_for_backward=saved_total,
        notes=tuple(notes),
    )


# -- tables --------------------------------------------------------------------------------


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[c]) for row in [header, *rows]) for c in range(len(header))]
    fmt = (
        "| "
        + " | ".join(f"{{:<{w}}}" if c == 0 else f"{{:>{w}}}" for c, w in enumerate(widths))
        + " |"
    )
    lines = [fmt.format(*header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += [fmt.format(*row) for row in rows]
    return "\n".join(lines)


def sizes_table(
    sizes: Sequence[str] = TABLE_SIZES,
    methods: Sequence[str] = METHODS,
    **settings: Any,
) -> str:
    """Total GiB for each model size (rows) and method (columns), as a Markdown table.

    ``settings`` are passed to `estimate` (batch, seq_len, rank, optimizer, grad_ckpt, ...).
    """
    header = ["model", *methods]
    rows = []
    for size in sizes:
        shape = model_shape(size)
        cells = [f"{size} ({shape.params() / 1e9:.3g}B)"]
        for method in methods:
            cells.append(f"{estimate(size, method, **settings).total / GiB:.1f}")  # type: ignore[arg-type]
        rows.append(cells)
    return _table(header, rows)


def compare_table(sizes: Sequence[str] = TABLE_SIZES, **overrides: Any) -> str:
    """Our estimate beside `PUBLISHED_TABLE`: "ours / published (ratio)" in GiB vs GB.

    Settings are `COMPARE_SETTINGS` (batch 1, seq 512, r=16, AdamW, bf16 on CUDA, full
    logits) with gradient checkpointing for LoRA/QLoRA only, updated by ``overrides``.
    """
    header = ["method", "bits", *sizes]
    bits = {"full-amp": "32", "full-16": "16", "lora-16": "16"}
    rows = []
    for method, published in PUBLISHED_TABLE.items():
        settings = {**COMPARE_SETTINGS, "grad_ckpt": not method.startswith("full"), **overrides}
        cells = [method, bits.get(method, method.rsplit("-", 1)[-1])]
        for size in sizes:
            ours = estimate(size, method, **settings).total / GiB  # type: ignore[arg-type]
            theirs = published.get(size)
            cells.append(
                f"{ours:.1f} / {theirs:g} ({ours / theirs:.2f}x)" if theirs else f"{ours:.1f}"
            )
        rows.append(cells)
    return _table(header, rows)
