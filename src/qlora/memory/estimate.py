"""The estimate: `estimate` adds weights, adapters, gradients and optimizer states
(parameter counts times bytes, k-bit storage read off `qlora.quant`) to the activation terms
of `qlora.memory.activations` into a `MemoryEstimate`. Section numbers (§) refer to that
module's docstring, the derivation.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from qlora.config import ConfigError, LoraConfig
from qlora.dtypes import DTYPE_NAMES, dtype_name
from qlora.memory.activations import _layer, _make_run, _sum
from qlora.memory.shapes import (
    METHODS,
    OPTIMIZERS,
    Attention,
    ComputeDtype,
    Device,
    Method,
    ModelShape,
    Optimizer,
    model_shape,
)

# Which quantization kind stores the base for each QLoRA method (blocksize 64, double quant).
_QUANT_KIND = {"qlora-8": "int8", "qlora-4": "nf4", "qlora-2": "nf2"}
# bitsandbytes' blockwise 8-bit optimizers: one float32 absmax per 256 values.
_OPTIM8_BLOCK = 256
_PAGE = 64 << 20  # the paged optimizers' default page (TrainConfig.optim_page_mb)
GiB = 2**30


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
    world_size: int = 1
    parallel: str = "none"

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
            label = "off-device (host memory)" if self.parallel == "fsdp" else "paged optimizer"
            rows.append((f"{label}", self.offloaded))
        return rows

    def __str__(self) -> str:
        ckpt = "gradient checkpointing" if self.grad_ckpt else "no gradient checkpointing"
        loss = "chunked loss" if self.chunked_loss else "full logits"
        where = f"; per rank of {self.world_size} ({self.parallel})" if self.world_size > 1 else ""
        lines = [
            f"{self.model}: {self.method}, {self.params / 1e9:.3g}B params "
            f"({self.trainable_params / 1e6:.4g}M trainable){where}",
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


def _fused_mlp(model: object, shape: ModelShape) -> bool:
    """Whether the MLP saves as `SwiGLUMLP` does: a module that has one, or a model by name or
    shape, which `load_model` builds with it (dense MLPs)."""
    from qlora.nn.swiglu import SwiGLUMLP

    if isinstance(model, nn.Module):
        return any(isinstance(m, SwiGLUMLP) for m in model.modules())
    return not shape.is_moe


def _module_defaults(model: nn.Module) -> tuple[str, str, str]:
    """(activation dtype, device, attention implementation) a module will train with.

    The activations have the dtype of the input embedding (the model's own dtype): a k-bit
    layer's or a CastLinear's compute dtype applies inside its matmul only."""
    tensors = [p for p in model.parameters() if p.is_floating_point()]
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        dtype = embeddings.weight.dtype
    else:
        dtype = tensors[0].dtype if tensors else torch.float32
    device = "cuda" if tensors and tensors[0].device.type == "cuda" else "cpu"
    config = getattr(model, "config", None)
    attention = getattr(config, "_attn_implementation", None) or "sdpa"
    name = dtype_name(dtype) if str(dtype).removeprefix("torch.") in DTYPE_NAMES else "float32"
    return name, device, "eager" if attention == "eager" else "sdpa"


# -- the estimate: inputs, settings, parameter memory, activation peak -----------------------


@dataclass(frozen=True)
class _Settings:
    """The resolved run settings: given ones, else the module's own, else the defaults."""

    rank: int
    lora_dropout: float
    compute_dtype: str
    device: str
    attention: str


def _check_inputs(method: str, optimizer: str, batch: int, seq_len: int) -> None:
    _choice("method", method, METHODS)
    _choice("optimizer", optimizer, OPTIMIZERS)
    _positive("batch", batch)
    _positive("seq_len", seq_len)


def _inventory(
    model: str | os.PathLike[str] | ModelShape | nn.Module,
    shape: ModelShape,
    method: str,
    rank: int,
    lora_dropout: float,
    compute_dtype: str | None,
    device: str | None,
    attention: str | None,
) -> tuple[_Params, _Settings]:
    """Parameter inventory and settings: a module's own adapters, dtype, device and attention
    win over the defaults (bfloat16 on CUDA, float32 on the CPU, sdpa)."""
    if isinstance(model, nn.Module):
        params, found_rank, found_dropout = _module_params(model, method, rank)
        rank = found_rank
        lora_dropout = found_dropout if found_dropout >= 0 else lora_dropout
        module_dtype, module_device, module_attention = _module_defaults(model)
        compute_dtype = compute_dtype or module_dtype
        device = device or module_device
        attention = attention or module_attention
    else:
        params = _shape_params(shape, method, rank)
        device = device or "cuda"
        compute_dtype = compute_dtype or ("bfloat16" if device == "cuda" else "float32")
        attention = attention or "sdpa"
    _choice("device", device, typing.get_args(Device))
    _choice("compute_dtype", compute_dtype, typing.get_args(ComputeDtype))
    _choice("attention", attention, typing.get_args(Attention))
    return params, _Settings(rank, lora_dropout, compute_dtype, device, attention)


@dataclass(frozen=True)
class _ParameterMemory:
    """§7: adapters, gradients and optimizer states (the paged part off the device)."""

    adapters: int
    gradients: int
    optimizer_states: int
    offloaded: int
    notes: tuple[str, ...]


def _parameter_memory(
    params: _Params, method: str, optimizer: str, device: str
) -> _ParameterMemory:
    lora = not method.startswith("full")
    adapters = math.ceil(params.trainable * params.trainable_dtype_bytes) if lora else 0
    gradients = math.ceil(params.trainable * params.trainable_dtype_bytes)
    if optimizer == "adamw":
        states = math.ceil(2 * params.trainable * params.trainable_dtype_bytes)
    elif optimizer == "paged_adamw":  # qlora.optim keeps float32 moments for any dtype
        states = 8 * params.trainable
    elif optimizer.endswith("adamw8bit"):
        states = math.ceil(2 * params.trainable * (1 + 4 / _OPTIM8_BLOCK))
    else:
        states = 0
    if not optimizer.startswith("paged_"):
        return _ParameterMemory(adapters, gradients, states, 0, ())
    # qlora.optim pages the states through one page (CPU: a memory-mapped file) or two
    # (CUDA: double-buffered from pinned host memory) of _PAGE bytes.
    resident = min(states, (2 if device == "cuda" else 1) * _PAGE)
    offloaded = states - resident
    where = "pinned host memory" if device == "cuda" else "a memory-mapped file on disk"
    note = (
        f"{optimizer}: {offloaded / GiB:.3g} GiB of optimizer states live in {where}, "
        f"paged in {_PAGE >> 20} MiB at a time: not in the total"
    )
    return _ParameterMemory(adapters, gradients, resident, offloaded, (note,))


def _per_rank(
    memory: _ParameterMemory,
    frozen: int,
    root: int,
    layers: int,
    world: int,
    parallel: str,
    cpu_offload: bool,
) -> tuple[int, _ParameterMemory]:
    """(weights, parameter memory) of one rank of ``world`` (docs/distributed.md).

    DDP: the whole model on every rank; the gradients live in its buckets
    (``gradient_as_bucket_view``), so nothing more. FSDP2: 1/N of every sharded tensor; the root
    group (embeddings, final norm, head: ``root`` bytes) stays gathered for the step and two
    decoder layers are gathered at once (the one running and the one prefetched), with one
    layer's full gradients alive while they are reduce-scattered. ``cpu_offload``: the shards
    (base, adapters, gradients, optimizer states) live in host memory; the device holds what
    is gathered.
    """
    if world == 1:
        return frozen, memory
    if parallel == "ddp":
        note = "DDP: every rank holds the whole model (the gradients are its reduction buckets)"
        return frozen, dataclasses.replace(memory, notes=(*memory.notes, note))
    layer = (frozen - root) / max(layers, 1)
    gathered = root + 2 * layer  # the root group and two layers, unsharded
    adapter_layer = memory.adapters / max(layers, 1)
    shards = (frozen / world, memory.adapters / world, memory.gradients / world)
    states = memory.optimizer_states / world
    note = (
        f"FSDP over {world} ranks: 1/{world} of the base, adapters, gradients and optimizer "
        f"states; gathered at once: the root group and two decoder layers "
        f"({gathered / GiB:.3g} GiB)"
    )
    if cpu_offload:
        offloaded = sum(shards) + states + memory.offloaded
        return math.ceil(gathered), _ParameterMemory(
            math.ceil(2 * adapter_layer),
            math.ceil(adapter_layer),
            0,
            math.ceil(offloaded),
            (*memory.notes, note, "cpu_offload: the shards live in host memory (not in the "
             "total); qlora's trainer does not offload yet: this is FSDP2's CPUOffloadPolicy"),
        )  # fmt: skip
    return math.ceil(shards[0] + gathered), _ParameterMemory(
        math.ceil(shards[1] + 2 * adapter_layer),
        math.ceil(shards[2] + adapter_layer),
        math.ceil(states),
        memory.offloaded,
        (*memory.notes, note),
    )


@dataclass(frozen=True)
class _Peak:
    """§2-§6: the larger of the two candidate peaks, split into the estimate's terms."""

    activations: int
    logits: int
    overhead: int
    phase: str
    saved_for_backward: int


def _loss_memory(
    shape: ModelShape, run: Any, chunked_loss: bool, loss_chunk_tokens: int
) -> tuple[int, int]:
    """(bytes the loss saves for backward, bytes alive at the loss's own peak)."""
    t = run.tokens
    if chunked_loss:
        chunk = min(t, loss_chunk_tokens)
        saved = t * shape.hidden * run.p  # the final hidden state, kept for recomputation
        return saved, saved + 3 * chunk * shape.vocab * 4
    saved = t * shape.vocab * 4 + 8 * t  # log_softmax output, targets
    return saved, 3 * t * shape.vocab * 4 + 8 * t


def _activation_peak(
    shape: ModelShape,
    run: Any,
    seq_len: int,
    grad_ckpt: bool,
    chunked_loss: bool,
    loss_chunk_tokens: int,
) -> _Peak:
    p, t, lora = run.p, run.tokens, run.lora
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
    loss_saved, loss_peak = _loss_memory(shape, run, chunked_loss, loss_chunk_tokens)
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
        phase = "loss backward (logits, log-softmax and their gradients)"
        return _Peak(*loss_phase, phase, saved_total)
    phase = "a decoder layer's backward" + (" (recomputed)" if grad_ckpt else "")
    return _Peak(*layer_phase, phase, saved_total)


def _context_notes(shape: ModelShape, device: str) -> list[str]:
    notes = []
    if shape.is_moe:
        notes.append("MoE activations are derived, not measured (experts as separate MLPs)")
    if device == "cpu":
        notes.append(
            "CPU: live tensor memory; qlora.train pins glibc's mmap threshold "
            "(train.malloc_mmap_kb) so RSS follows it - other loops on glibc's default malloc "
            "can see 1.4-2.7x this (docs/memory.md)"
        )
    return notes


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
    loss_chunk_tokens: int = 256,
    world_size: int = 1,
    parallel: Literal["ddp", "fsdp"] = "ddp",
    cpu_offload: bool = False,
) -> MemoryEstimate:
    """Estimate the peak memory of one fine-tuning step.

    Args:
        model: a size ("135m", "7b", "13b", "30b", "70b", "110b", "8x7b", "8x22b", ... see
            `SIZES`), a path to a ``config.json`` or a model directory, a `ModelShape`, or
            a loaded ``nn.Module`` (its real parameters and buffers are counted, QuantLinear's
            packed weights included; adapters already in it are taken as they are).
        method: what is trained and how the base is stored: full fine-tuning (mixed
            precision or 16-bit), LoRA on a 16-bit base, or QLoRA on an 8-, 4- or 2-bit base.
        batch: sequences per step.
        seq_len: tokens per sequence.
        rank: LoRA rank (None: `LoraConfig`'s); ignored for full fine-tuning.
        optimizer: one of the trainer's optimizers (``train.optim``), or "sgd" (no state:
            the floor the others are compared with).
        grad_ckpt: gradient checkpointing of every decoder layer.
        compute_dtype: dtype of the activations; default bfloat16 on CUDA, float32 on the
            CPU (for a module: its QuantLinear compute dtype, else its parameters' dtype).
        device: where the step runs (dropout masks differ; paged states only page off
            CUDA); default cuda, or where the module's parameters are.
        chunked_loss: the loss never forms full [T, V] float32 logits (our trainer); False
            for transformers' ``model(ids, labels=...)`` loss.
        lora_dropout: adapter dropout (default `LoraConfig`'s; for a module with adapters,
            theirs).
        attention: "sdpa" or "eager" (default: the module's configured implementation, else
            "sdpa").
        loss_chunk_tokens: tokens per chunk of the chunked loss.
        world_size: ranks of a torchrun job; the estimate is then per rank, ``batch`` being
            each rank's (as ``train.batch_size``).
        parallel: how the ranks split the work (``train.parallel``): "ddp" (the whole model
            on each) or "fsdp" (base, adapters, gradients and optimizer states sharded).
        cpu_offload: with fsdp, the shards kept in host memory (FSDP2's CPUOffloadPolicy).

    Returns:
        A `MemoryEstimate`; ``print`` it for a breakdown in GiB.

    Raises:
        ConfigError: an unknown size, method, optimizer or dtype, a missing config.json, or
            a non-positive batch/seq_len/rank; the message lists the valid choices.
    """
    _check_inputs(method, optimizer, batch, seq_len)
    defaults = LoraConfig()
    rank = defaults.r if rank is None else _positive("rank", rank)
    dropout = defaults.dropout if lora_dropout is None else float(lora_dropout)
    shape = model_shape(model)
    params, settings = _inventory(
        model, shape, method, rank, dropout, compute_dtype, device, attention
    )
    memory = _parameter_memory(params, method, optimizer, settings.device)
    world = _positive("world_size", world_size)
    _choice("parallel", parallel, ("ddp", "fsdp"))
    if cpu_offload and (parallel != "fsdp" or world == 1):
        raise ConfigError("cpu_offload needs parallel='fsdp' and world_size > 1")
    root_bytes = shape.other_params() * (4 if settings.compute_dtype == "float32" else 2)
    root_bytes = min(root_bytes, params.frozen_bytes)
    weights, memory = _per_rank(
        memory, params.frozen_bytes, root_bytes, shape.layers, world, parallel, cpu_offload
    )
    run = _make_run(
        batch,
        seq_len,
        method,
        settings.rank,
        settings.lora_dropout,
        settings.compute_dtype,
        settings.device,
        settings.attention,
        _fused_mlp(model, shape),
    )
    peak = _activation_peak(shape, run, seq_len, grad_ckpt, chunked_loss, loss_chunk_tokens)
    notes = [*params.notes, *memory.notes, *_context_notes(shape, settings.device)]
    return MemoryEstimate(
        model=shape.name,
        method=method,
        batch=batch,
        seq_len=seq_len,
        rank=settings.rank,
        optimizer=optimizer,
        grad_ckpt=grad_ckpt,
        compute_dtype=settings.compute_dtype,  # type: ignore[arg-type]
        device=settings.device,  # type: ignore[arg-type]
        chunked_loss=chunked_loss,
        params=params.total,
        trainable_params=params.trainable,
        weights=weights,
        adapters=memory.adapters,
        gradients=memory.gradients,
        optimizer_states=memory.optimizer_states,
        activations=peak.activations,
        logits=peak.logits,
        overhead=peak.overhead,
        offloaded=memory.offloaded,
        peak_phase=peak.phase,
        saved_for_backward=peak.saved_for_backward,
        notes=tuple(notes),
        world_size=world,
        parallel=parallel if world > 1 else "none",
    )
