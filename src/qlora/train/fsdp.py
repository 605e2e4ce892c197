"""FSDP2 over a k-bit base: the packed bytes are what is sharded and what travels.

``train.parallel: fsdp`` shards the model with PyTorch's ``fully_shard`` (FSDP2): one
group per decoder layer, the root group (embeddings, final norm, output head) around the
whole loss computation. Each rank keeps 1/N of every parameter between uses and all-gathers
a layer's parameters just before its forward (and again before its backward).

The frozen 4-bit base takes part as it is stored. `QuantLinear.storage_as_parameters` turns
its packed codes (uint8), block scales (uint8 under double quantization, else float32) and
nested scales into frozen parameters, so FSDP2 shards and gathers *them*: never a
dequantized bf16/fp32 weight. FSDP2 gathers a group whose tensors have different dtypes as
raw bytes (a ``uint8`` view of each), so no packed byte is ever read as a float on the way
(bitsandbytes #1945: packed NF4 bytes stored as bf16 came back rewritten where they looked
like NaNs). The layer dequantizes from the gathered bytes exactly as on one process.

The trainable adapters are sharded too (FSDP2 reduce-scatters their gradients, averaged
over the ranks like DDP), and so is the optimizer state: torch's AdamW works on the
sharded parameters directly. A checkpoint is sharded the same way: each rank writes its
pieces (`qlora.train.checkpoint.save_sharded_checkpoint`), reading joins them into full
tensors, and `shard_like` cuts those for the ranks of the resuming run, whatever its world
size or mode. `full_tensors` gathers a tree of DTensors where a full copy is wanted.

`GatherCounter` is the all-gather each group uses (FSDP2's ``set_custom_all_gather`` hook):
it calls ``all_gather_single`` as FSDP2's default does and counts the bytes, so the
trainer logs what really moved, next to what the same gathers would move with a bf16 base
(every base weight at 2 bytes, no scales; the adapters as they are).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from qlora.config import LoraConfig
from qlora.nn.qlinear import QuantLinear
from qlora.nn.staged_lora import StagedLora

__all__ = [
    "GatherCounter",
    "ShardWhileLoading",
    "full_tensors",
    "gathered_bytes",
    "gathered_trainable",
    "held_bytes",
    "resident_base_bytes",
    "shard_for_training",
    "shard_like",
]


class GatherCounter:
    """An FSDP2 all-gather (duck-typed to its ``AllGather``) that counts what it moves."""

    def __init__(self, bf16_bytes: int) -> None:
        self.bf16_bytes = bf16_bytes  # one gather of this group with a bf16 base
        self.bytes = 0  # the gathered (full) buffers, summed over calls
        self.calls = 0
        self.dtypes: set[torch.dtype] = set()

    def allocate(
        self, size: Sequence[int], *, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(
        self,
        output_tensor: torch.Tensor,
        input_tensor: torch.Tensor,
        group: dist.ProcessGroup,
        async_op: bool = False,
    ) -> dist.Work | None:
        self.bytes += output_tensor.numel() * output_tensor.element_size()
        self.calls += 1
        self.dtypes.add(output_tensor.dtype)
        return dist.all_gather_single(output_tensor, input_tensor, group=group, async_op=async_op)


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    decoder = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(
            f"train.parallel=fsdp: {type(model).__name__} has no decoder.layers to shard by "
            "(the Llama-family layout); use train.parallel=ddp"
        )
    return layers


def _bf16_bytes(modules: Sequence[nn.Module], skip: set[int]) -> int:
    """What the parameters of ``modules`` (minus those in ``skip``) would gather with a bf16
    base: each quantized weight out x in x 2 bytes and no scales, frozen tensors 2 bytes an
    element, trainable ones at their own size."""
    total, seen = 0, set(skip)
    for module in modules:
        for sub in module.modules():
            for name, param in sub.named_parameters(recurse=False):
                if id(param) in seen:
                    continue
                seen.add(id(param))
                if isinstance(sub, QuantLinear) and name in QuantLinear.SHARDABLE:
                    total += sub.out_features * sub.in_features * 2 if name == "weight" else 0
                elif param.requires_grad:
                    total += param.numel() * param.element_size()
                else:
                    total += param.numel() * 2
    return total


def _mesh(world_size: int, device: torch.device) -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (world_size,))


def _offload(cpu_offload: bool) -> Any:
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy

    return CPUOffloadPolicy() if cpu_offload else OffloadPolicy()


def _shard_block(block: nn.Module, mesh: Any, cpu_offload: bool = False) -> None:
    """``fully_shard`` one decoder layer, its packed base as parameters, with a counter."""
    from torch.distributed.fsdp import fully_shard

    for layer in block.modules():
        if isinstance(layer, QuantLinear):
            layer.storage_as_parameters()
    counter = GatherCounter(_bf16_bytes([block], set()))
    fully_shard(block, mesh=mesh, offload_policy=_offload(cpu_offload))
    block.set_custom_all_gather(counter)
    block.gather_counter = counter


def shard_for_training(
    module: nn.Module, model: nn.Module, world_size: int, cpu_offload: bool = False
) -> nn.Module:
    """``fully_shard`` each decoder layer of ``model``, then ``module`` (the root) around it.

    ``module`` is the trainer's loss computation (it holds ``model``). Layers sharded while
    loading (`ShardWhileLoading`) are kept as they are. Every group gets a `GatherCounter`,
    listed in ``module.gather_counters``. ``cpu_offload``: every group's shards rest in host
    memory (FSDP2's ``CPUOffloadPolicy``; CUDA ranks). Returns ``module``, now FSDP2's.
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard

    blocks = _decoder_layers(model)
    sharded = [b for b in blocks if isinstance(b, FSDPModule)]
    mesh = (
        next(p for p in sharded[0].parameters() if isinstance(p, DTensor)).device_mesh
        if sharded
        else _mesh(world_size, next(model.parameters()).device)
    )
    for block in blocks:
        if not isinstance(block, FSDPModule):
            _shard_block(block, mesh, cpu_offload)
    # after sharding: fully_shard replaces each parameter by a new (DTensor) one
    in_blocks = {id(p) for block in blocks for p in block.parameters()}
    counters = [block.gather_counter for block in blocks]
    counters.append(GatherCounter(_bf16_bytes([module], in_blocks)))
    fully_shard(module, mesh=mesh, offload_policy=_offload(cpu_offload))
    module.set_custom_all_gather(counters[-1])
    module.gather_counters = counters
    return module


class ShardWhileLoading:
    """A `qlora.models.loader.BlockSink` for FSDP: each decoder layer gets its adapters and is
    sharded the moment it has loaded, so a rank holds at most one whole layer of the base
    (plus its shards of the others and the parts outside the layers, sharded with the root
    later), instead of the whole model as a plain load would.

    The adapters are drawn before loading (`qlora.nn.staged_lora.StagedLora`), seeded with
    ``seed`` right before, as the recipe seeds `add_lora`: the same adapters as a world-1 run.
    ``peak_bytes`` is the most this rank held of the model (frozen and trainable, its local
    shards of sharded tensors) while loading, measured as each layer arrived.
    """

    def __init__(
        self,
        lora: LoraConfig,
        seed: int,
        world_size: int,
        device: torch.device,
        cpu_offload: bool = False,
    ) -> None:
        self.lora, self.seed, self.device, self.cpu_offload = lora, seed, device, cpu_offload
        self.mesh = _mesh(world_size, device)
        self.adapters: StagedLora | None = None
        self.model: nn.Module | None = None
        self.peak_bytes = 0

    def start(self, skeleton: nn.Module) -> None:
        torch.manual_seed(self.seed)
        self.adapters = StagedLora(skeleton, self.lora, self.device)
        self.model = skeleton

    def block(self, name: str, layer: nn.Module) -> None:
        assert self.adapters is not None and self.model is not None, "start() first"
        self.adapters.attach(layer, name)
        self.peak_bytes = max(self.peak_bytes, held_bytes(self.model))
        _shard_block(layer, self.mesh, self.cpu_offload)

    def finish(self, model: nn.Module) -> nn.Module:
        """After loading: the adapters outside the layers, frozen base, active adapter."""
        assert self.adapters is not None, "start() first"
        self.peak_bytes = max(self.peak_bytes, held_bytes(model))
        return self.adapters.finish(model)


def held_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s tensors this rank holds (meta ones hold none; DTensors: shards)."""
    total, seen = 0, set()
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) in seen or tensor.device.type == "meta":
            continue
        seen.add(id(tensor))
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        total += local.numel() * local.element_size()
    return total


def gathered_bytes(module: nn.Module) -> tuple[int, int]:
    """(bytes all-gathered so far by ``module``'s FSDP2 groups, what the same gathers would
    have moved with a bf16 base); (0, 0) for a module that is not sharded."""
    counters = getattr(module, "gather_counters", ())
    return sum(c.bytes for c in counters), sum(c.calls * c.bf16_bytes for c in counters)


def resident_base_bytes(model: nn.Module) -> int:
    """Bytes this rank holds of the frozen model: its shards of frozen parameters + buffers."""
    total = 0
    for param in model.parameters():
        if not param.requires_grad:
            local = param.to_local() if isinstance(param, DTensor) else param
            total += local.numel() * local.element_size()
    for buffer in model.buffers():
        total += buffer.numel() * buffer.element_size()
    return total


def full_tensors(tree: Any) -> Any:
    """``tree`` with every DTensor gathered to a full plain tensor (a collective: all ranks)."""
    if isinstance(tree, DTensor):
        return tree.full_tensor()
    if isinstance(tree, dict):
        return {k: full_tensors(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(full_tensors(v) for v in tree)
    return tree


def shard_like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``value`` (a full tensor, the same on every rank) laid out as ``param``: this rank's
    shard of it when ``param`` is a DTensor, ``value`` itself otherwise. No communication."""
    if not isinstance(param, DTensor) or tuple(value.shape) != tuple(param.shape):
        return value
    return distribute_tensor(
        value.to(param.device), param.device_mesh, param.placements, src_data_rank=None
    )


@contextlib.contextmanager
def gathered_trainable(model: nn.Module) -> Iterator[None]:
    """Within the block, ``model``'s trainable parameters are full plain tensors (to save).

    Every rank must enter it (it all-gathers); the sharded parameters are put back after.
    """
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.requires_grad and isinstance(param, DTensor):
                full = nn.Parameter(param.full_tensor().detach(), requires_grad=False)
                setattr(module, name, full)
                swapped.append((module, name, param))
    try:
        yield
    finally:
        for module, name, param in swapped:
            setattr(module, name, param)
