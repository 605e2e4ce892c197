"""Training on several processes with torch.distributed: the job's shape, and DDP.

A run started by ``torchrun --nproc-per-node N`` (or ``--nnodes``) finds its place in the
job in the environment torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT``). `distributed_session` turns that into a process group
(gloo on the CPU, NCCL on CUDA) for the duration of a run and a `Distributed` value that the
trainer and the recipe are handed explicitly: nothing here is global state, and a process
that was not started by torchrun gets the world of one, on which every method is a no-op.

How the work is split (``train.parallel``):

* ``ddp``: every rank holds the whole model; `wrap_for_training` puts the loss computation
  under PyTorch's ``DistributedDataParallel``, which registers its all-reduce only for
  parameters that require a gradient, so only the adapters' gradients travel, bucketed and
  overlapped with the backward. The frozen base is not broadcast at start (``init_sync`` off:
  every rank loaded the same file); the adapters are broadcast from rank 0 instead, so the
  ranks start from identical adapters whatever their RNG did.
* ``fsdp``: FSDP2's ``fully_shard`` per decoder layer; the k-bit base is sharded and
  gathered as its packed bytes (`qlora.train.fsdp`), the adapters and their optimizer state
  sharded too.

Data: ``train.batch_size`` is per rank, as Hugging Face's per-device batch size. Each step's
global batch of ``world × batch_size`` examples is drawn exactly as a single process with
that batch size would draw it, and rank r takes its r-th slice (`rank_slice`), so N ranks
walk the same examples in the same steps as one process with N times the batch. A slice
past the end of a short last batch is a "blank" row (labels all ignored): it adds nothing
to the loss or the gradients but keeps every rank in the collectives.

Loss: each rank sums its tokens' losses; the token count of the whole global step is
all-reduced first, so every rank divides by the same number, and DDP's mean over ranks is
undone by the factor ``world`` (the gradient is then exactly that of the global token mean).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from qlora.config import ParallelMode

__all__ = [
    "Distributed",
    "ParallelError",
    "TrainingModule",
    "check_offload",
    "distributed_session",
    "rank_slice",
    "torchrun_world",
    "wrap_for_training",
]

_TIMEOUT = timedelta(minutes=30)  # gloo / NCCL's own default: a slow checkpoint must fit


class ParallelError(RuntimeError):
    """The torchrun environment and ``train.parallel`` do not fit; the message says how."""


def torchrun_world() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) from torchrun's environment; None outside torchrun."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError:
        raise ParallelError(
            f"RANK={os.environ['RANK']!r} / WORLD_SIZE={os.environ['WORLD_SIZE']!r} are not "
            "integers: start the job with torchrun, or unset them"
        ) from None
    if not 0 <= rank < world:
        raise ParallelError(f"RANK={rank} is outside WORLD_SIZE={world}: start with torchrun")
    return rank, world, local


@dataclass(frozen=True)
class Distributed:
    """This process's place in the job: rank, world size, how the work is split.

    The world of one (the default value) is a plain single-process run: every collective
    returns its input. Collectives run on ``device`` (the CPU for gloo, the rank's GPU for
    NCCL) and must be called by every rank in the same order.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    mode: Literal["none", "ddp", "fsdp"] = "none"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that claims the output directory, logs and writes files."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sums over the ranks (float64: token counts stay exact)."""
        return self._all_reduce(values, dist.ReduceOp.SUM)

    def all_reduce_max(self, values: Sequence[float]) -> list[float]:
        """Element-wise maxima over the ranks (e.g. the peak memory of the fullest rank)."""
        return self._all_reduce(values, dist.ReduceOp.MAX)

    def _all_reduce(self, values: Sequence[float], op: Any) -> list[float]:
        if not self.active:
            return [float(v) for v in values]
        tensor = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=op)
        return tensor.tolist()

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (small Python values: a path, a message).

        torch.distributed pickles it in memory between this job's own processes; nothing
        read from a file is ever unpickled.
        """
        if not self.active:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order, on every rank (small Python values)."""
        if not self.active:
            return [value]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def _resolve_mode(mode: ParallelMode, world: int) -> Literal["none", "ddp", "fsdp"]:
    if world == 1:
        return "none"
    if mode == "none":
        raise ParallelError(
            f"train.parallel=none, but torchrun started {world} processes: each would train "
            "alone and write the same files. Set train.parallel=ddp (or fsdp), or run "
            "without torchrun"
        )
    return "fsdp" if mode == "fsdp" else "ddp"


@contextlib.contextmanager
def distributed_session(mode: ParallelMode, device: torch.device) -> Iterator[Distributed]:
    """The process group of a torchrun job for the duration of a run (nothing outside one).

    Sets up gloo (CPU) or NCCL (``device`` is CUDA: each rank uses ``cuda:LOCAL_RANK``) when
    the world has more than one process and no group exists yet, and destroys what it set
    up on the way out, error or not. A group the caller set up is used and left alone.
    """
    place = torchrun_world()
    if place is None or place[1] == 1:
        yield Distributed(device=device)
        return
    rank, world, local = place
    resolved = _resolve_mode(mode, world)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    owned = not dist.is_initialized()
    if owned:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=_TIMEOUT)
    elif dist.get_world_size() != world or dist.get_rank() != rank:
        raise ParallelError(
            f"the process group (rank {dist.get_rank()} of {dist.get_world_size()}) is not "
            f"torchrun's (rank {rank} of {world})"
        )
    try:
        yield Distributed(rank, world, local, resolved, device)
        if owned:
            dist.barrier()  # every rank's last collective is done before the group goes
    finally:
        if owned and dist.is_initialized():
            dist.destroy_process_group()


def rank_slice(indices: Sequence[int], place: Distributed, per_rank: int) -> list[int]:
    """Rank ``place.rank``'s share of one global batch of example indices (may be empty)."""
    start = place.rank * per_rank
    return list(indices[start : start + per_rank])


class TrainingModule(nn.Module):
    """The loss computation as one module, so that DDP's forward sees every step.

    The trainer computes the loss from the decoder's hidden states and the head in chunks
    (`qlora.train.loss.causal_lm_loss`) rather than through the model's own forward; DDP
    prepares its gradient reduction in *its* forward, so the whole computation goes there.
    """

    def __init__(self, model: nn.Module, loss_fn: Any, device: torch.device) -> None:
        super().__init__()
        self.model, self.loss_fn, self.device = model, loss_fn, device

    def forward(self, batch: dict[str, torch.Tensor], chunk: int) -> tuple[torch.Tensor, int]:
        # to the compute device (under FSDP CPU offload the parameters rest on the CPU)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        return self.loss_fn(self.model, batch, chunk)


def _broadcast_trainable(model: nn.Module) -> None:
    """Rank 0's adapters on every rank (in place; the frozen base is left alone)."""
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                dist.broadcast(param.data, src=0)


def check_offload(cpu_offload: bool, place: Distributed) -> None:
    """``train.cpu_offload`` needs FSDP on CUDA ranks; anything else is refused, saying why."""
    if not cpu_offload:
        return
    if place.mode != "fsdp":
        raise ParallelError(
            "train.cpu_offload offloads FSDP's shards: it needs train.parallel=fsdp under "
            f"torchrun with more than one process (this run: {place.mode}, world "
            f"{place.world_size}); drop it, or launch with torchrun and fsdp"
        )
    if place.device.type != "cuda":
        raise ParallelError(
            f"train.cpu_offload moves FSDP's shards from the GPU to host memory; these ranks "
            f"run on {place.device.type}, whose shards are in host memory already: drop it"
        )


def wrap_for_training(
    model: nn.Module, loss_fn: Any, place: Distributed, cpu_offload: bool = False
) -> nn.Module:
    """The module the trainer calls for a micro-batch's loss: ``module(batch, chunk)``.

    World 1: `TrainingModule` itself. DDP: that module under ``DistributedDataParallel``,
    reducing the trainable parameters' gradients only. FSDP: ``model`` sharded in place
    (`qlora.train.fsdp.shard_for_training`; its parameters become DTensors) and that module
    the root of the shards.
    """
    check_offload(cpu_offload, place)
    device = place.device if cpu_offload else next(model.parameters()).device
    module = TrainingModule(model, loss_fn, device)
    if place.mode == "none":
        return module
    if place.mode == "ddp":
        _broadcast_trainable(model)
        return nn.parallel.DistributedDataParallel(
            module,
            device_ids=[place.device.index] if place.device.type == "cuda" else None,
            broadcast_buffers=False,  # frozen buffers (the packed base) never change
            init_sync=False,  # every rank loaded the same base; adapters broadcast above
            gradient_as_bucket_view=True,  # the gradients live in the buckets: no copy
        )
    if place.mode == "fsdp":
        from qlora.train.fsdp import shard_for_training

        try:
            return shard_for_training(module, model, place.world_size, cpu_offload)
        except ValueError as err:
            raise ParallelError(str(err)) from None
    raise ParallelError(f"train.parallel={place.mode}: unknown; choose none, ddp or fsdp")


@contextlib.contextmanager
def gradient_sync(module: nn.Module, enabled: bool) -> Iterator[None]:
    """Within the block, DDP / FSDP2 reduce gradients only when ``enabled`` (accumulation)."""
    if enabled:
        yield
        return
    no_sync = getattr(module, "no_sync", None)  # DDP
    if no_sync is not None:
        with no_sync():
            yield
        return
    set_sync = getattr(module, "set_requires_gradient_sync", None)  # FSDP2
    if set_sync is None:
        yield
        return
    set_sync(False)
    try:
        yield
    finally:
        set_sync(True)


def as_float(value: torch.Tensor | float) -> float:
    """A scalar that may be a DTensor (a sharded norm) as a Python float."""
    full = getattr(value, "full_tensor", None)
    return float(full() if full is not None else value)
