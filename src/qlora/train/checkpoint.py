"""Resumable training checkpoints: safetensors + JSON, no pickle, written atomically.

A checkpoint is a directory ``checkpoint-<step>/`` with two files:

* ``tensors.safetensors``: every tensor of the state (trainable parameters, optimizer
  moments, RNG states), keyed by its path in the state tree (``trainable/<name>``,
  ``optimizer/state/3/exp_avg``, ``rng/torch``);
* ``state.json``: the rest of the tree - step, data cursor, history, config, scheduler,
  optimizer hyper-parameters, Python's RNG state - with each tensor replaced by a reference
  ``{"__tensor__": key}``. Tuples and dicts with non-string keys (the optimizer's state is
  keyed by parameter index) are tagged so they come back as they went in.

Why not ``torch.save``: a pickle is a program, and loading a crafted ``state.pt`` from a
shared run directory runs its payload (``weights_only=False`` was needed for the RNG and
optimizer state). Nothing here ever unpickles; a directory holding only a ``state.pt`` (an
older qlora's checkpoint) is refused with a message, never loaded.

Under FSDP (``train.parallel: fsdp``) the adapters and their optimizer moments are sharded
across the ranks, and so is the checkpoint: each rank writes its own pieces to
``shard-<rank>-of-<world>.safetensors`` (nothing is gathered, so no rank ever holds the
full adapter and optimizer state on its device), rank 0 writes the replicated rest (RNG
states, step counters) to ``tensors.safetensors`` and ``state.json``, where a sharded tensor
is ``{"__sharded__": key, "shape": [...]}``. Every piece is a row block (FSDP2 shards dim 0
as ``torch.chunk`` does), so reading concatenates the files' pieces in rank order into the
full tensor: a checkpoint resumes at any world size and in any mode. This stands in for
``torch.distributed.checkpoint``, whose ``.metadata`` file is a pickle.

The directory is written into a temporary sibling and renamed into place
(`qlora.files.staged_directory`); ``latest`` (a one-line file naming the newest directory, for
people and scripts) is replaced atomically after that. A run killed at any instant - SIGKILL
included - leaves the previous checkpoint intact.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from qlora.files import atomic_write, staged_directory
from qlora.models.safetensors_io import SafetensorsError, SafetensorsReader, write_safetensors

if TYPE_CHECKING:
    from qlora.train.parallel import Distributed

__all__ = [
    "CHECKPOINT_FILES",
    "CheckpointError",
    "checkpoint_dirs",
    "checkpoint_run_id",
    "decode_state",
    "encode_state",
    "load_checkpoint",
    "only_checkpoint_files",
    "rng_state",
    "save_checkpoint",
    "save_sharded_checkpoint",
    "set_rng_state",
    "trainable_state",
]

FORMAT = "qlora-checkpoint/1"
STATE_FILE, TENSOR_FILE = "state.json", "tensors.safetensors"
SHARD_FILE = "shard-{rank:05d}-of-{world:05d}.safetensors"
CHECKPOINT_FILES = (STATE_FILE, TENSOR_FILE)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or does not fit this run; the message names it."""


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model: nn.Module, copy: bool = True) -> dict[str, torch.Tensor]:
    """The trainable parameters by name: copies, or (``copy=False``) detached views."""
    return {
        n: p.detach().clone() if copy else p.detach()
        for n, p in model.named_parameters()
        if p.requires_grad
    }


# --- the state tree <-> (JSON, tensors) ------------------------------------------------------


def encode_state(
    tree: Any,
    tensors: dict[str, torch.Tensor],
    path: str = "",
    local: dict[str, torch.Tensor] | None = None,
) -> Any:
    """``tree`` as JSON-able values; its tensors go into ``tensors`` under their tree path.

    With ``local``, a DTensor sharded by rows (FSDP2's layout) puts this rank's piece there
    instead and is written as a ``__sharded__`` reference with its full shape.
    """
    if isinstance(tree, DTensor) and local is not None:
        if tree.device_mesh.ndim != 1 or tree.placements != (Shard(0),):
            raise TypeError(f"checkpoint state at {path!r}: cannot store {tree.placements}")
        local[path] = tree.to_local()
        return {"__sharded__": path, "shape": list(tree.shape)}
    if isinstance(tree, torch.Tensor):
        tensors[path] = tree
        return {"__tensor__": path}

    def inner(value: Any, key: str) -> Any:
        return encode_state(value, tensors, key, local)

    if isinstance(tree, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in tree):
            return {k: inner(v, f"{path}/{k}" if path else k) for k, v in tree.items()}
        return {"__items__": [[k, inner(v, f"{path}/{k}")] for k, v in tree.items()]}
    if isinstance(tree, tuple):
        return {"__tuple__": [inner(v, f"{path}/{i}") for i, v in enumerate(tree)]}
    if isinstance(tree, list):
        return [inner(v, f"{path}/{i}") for i, v in enumerate(tree)]
    if tree is None or isinstance(tree, bool | int | float | str):
        return tree
    raise TypeError(f"checkpoint state at {path!r}: cannot store a {type(tree).__name__}")


Joiner = Callable[[str, list[int]], torch.Tensor]


def decode_state(tree: Any, tensors: dict[str, torch.Tensor], join: Joiner | None = None) -> Any:
    """The inverse of `encode_state`; a reference to a missing tensor raises KeyError.

    ``join(key, shape)`` returns the full tensor of a ``__sharded__`` reference.
    """
    if isinstance(tree, dict):
        if set(tree) == {"__tensor__"}:
            return tensors[tree["__tensor__"]]
        if set(tree) == {"__sharded__", "shape"}:
            if join is None:
                raise KeyError(f"{tree['__sharded__']} is sharded; the checkpoint lists no shards")
            return join(tree["__sharded__"], tree["shape"])
        if set(tree) == {"__tuple__"}:
            return tuple(decode_state(v, tensors, join) for v in tree["__tuple__"])
        if set(tree) == {"__items__"}:
            return {_key(k): decode_state(v, tensors, join) for k, v in tree["__items__"]}
        return {k: decode_state(v, tensors, join) for k, v in tree.items()}
    if isinstance(tree, list):
        return [decode_state(v, tensors, join) for v in tree]
    return tree


def _shard_reader(path: Path, name: Any) -> SafetensorsReader:
    if not isinstance(name, str) or "/" in name or not name.endswith(".safetensors"):
        raise ValueError(f"bad shard file name {name!r}")
    if not (path / name).is_file():
        raise CheckpointError(f"{path / name} is missing: the checkpoint is incomplete")
    return SafetensorsReader(path / name)


def _joiner(path: Path, shards: list[SafetensorsReader]) -> Joiner:
    def join(key: str, shape: list[int]) -> torch.Tensor:
        # the pieces are row blocks in rank order (a rank's block may be empty)
        full = torch.cat([reader.get(key) for reader in shards])
        if list(full.shape) != list(shape):
            raise ValueError(f"{key}: the shards join to {list(full.shape)}, expected {shape}")
        return full

    return join


def _key(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key


# --- directories -----------------------------------------------------------------------------


def only_checkpoint_files(path: Path) -> bool:
    """Whether directory ``path`` holds nothing but files a checkpoint is made of (ours to
    delete when pruning or starting over: a user's file beside them keeps the directory)."""
    return all(
        p.name in CHECKPOINT_FILES or re.fullmatch(r"shard-\d{5}-of-\d{5}\.safetensors", p.name)
        for p in path.iterdir()
    )


def checkpoint_dirs(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every ``checkpoint-<step>`` directory, oldest first."""
    found = []
    for path in output_dir.glob("checkpoint-*"):
        suffix = path.name.removeprefix("checkpoint-")
        if suffix.isdigit() and path.is_dir():
            found.append((int(suffix), path))
    return sorted(found)


def save_checkpoint(output_dir: Path, step: int, state: dict[str, Any], run_id: str) -> Path:
    """Write ``state`` as ``output_dir/checkpoint-<step>`` atomically; returns its path."""
    tensors: dict[str, torch.Tensor] = {}
    body = {"format": FORMAT, "run_id": run_id, "state": encode_state(state, tensors)}
    final = output_dir / f"checkpoint-{step}"
    with staged_directory(final, last=(STATE_FILE,)) as staging:
        write_safetensors(staging / TENSOR_FILE, tensors, {"format": "pt"})
        atomic_write(staging / STATE_FILE, json.dumps(body) + "\n")
    atomic_write(output_dir / "latest", final.name + "\n")
    return final


def save_sharded_checkpoint(
    output_dir: Path, step: int, state: dict[str, Any], run_id: str, place: Distributed
) -> Path:
    """`save_checkpoint` under FSDP; every rank calls it with its own (sharded) ``state``.

    Each rank writes its pieces of the sharded tensors into rank 0's staging directory; rank 0
    then writes the rest and publishes the directory. A failure on any rank (a full disk)
    raises on every rank and publishes nothing; a killed rank leaves only a hidden staging
    directory behind, never a partial ``checkpoint-<step>``.
    """
    tensors: dict[str, torch.Tensor] = {}
    local: dict[str, torch.Tensor] = {}
    body = {"format": FORMAT, "run_id": run_id, "state": encode_state(state, tensors, local=local)}
    world = place.world_size
    body["shards"] = [SHARD_FILE.format(rank=r, world=world) for r in range(world)]
    final = output_dir / f"checkpoint-{step}"
    outcome: str | None = None
    try:
        with contextlib.ExitStack() as stack:
            staging, problem = None, None
            if place.is_main:
                try:
                    staging = stack.enter_context(staged_directory(final, last=(STATE_FILE,)))
                except OSError as err:
                    problem = f"rank 0: {err}"
            staging, problem = place.broadcast((staging, problem))
            if problem is None:
                try:
                    write_safetensors(Path(staging) / body["shards"][place.rank], local)
                except OSError as err:
                    problem = f"rank {place.rank}: {err}"
            problems = [p for p in place.gather(problem) if p is not None]
            if problems:
                raise CheckpointError(f"{final} was not written: {problems[0]}")
            if place.is_main:  # an OSError here leaves the block: nothing is published
                write_safetensors(Path(staging) / TENSOR_FILE, tensors, {"format": "pt"})
                atomic_write(Path(staging) / STATE_FILE, json.dumps(body) + "\n")
    except OSError as err:  # rank 0's own files or the publishing rename; told to all below
        outcome = f"rank 0: {err}"
    if place.is_main and outcome is None:
        try:
            atomic_write(output_dir / "latest", final.name + "\n")
        except OSError as err:
            outcome = f"rank 0: {err}"
    outcome = place.broadcast(outcome)
    if outcome is not None:
        raise CheckpointError(f"{final} was not written: {outcome}")
    return final


def checkpoint_run_id(path: Path) -> str | None:
    """The run id recorded in checkpoint ``path`` (None when unreadable)."""
    try:
        body = json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return body.get("run_id") if isinstance(body, dict) else None


def load_checkpoint(path: Path) -> tuple[str, dict[str, Any]]:
    """(run id, state) of checkpoint ``path``.

    Raises:
        CheckpointError: missing or malformed files, an older pickle checkpoint, a reference
            to a tensor the file lacks; the message names the file and the problem.
    """
    state_file = path / STATE_FILE
    if not state_file.is_file():
        if (path / "state.pt").is_file():
            raise CheckpointError(
                f"{path}: an older qlora's pickle checkpoint (state.pt); it is not loaded, "
                "since unpickling can run code. Start a new run (another train.output_dir)"
            )
        raise CheckpointError(f"{path}: no {STATE_FILE}: not a complete checkpoint")
    try:
        body = json.loads(state_file.read_text())
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            raise ValueError(f"expected format {FORMAT!r}")
        with contextlib.ExitStack() as stack:
            reader = stack.enter_context(SafetensorsReader(path / TENSOR_FILE))
            # copies: the optimizer keeps and updates these tensors in place, and the
            # reader's views are of a read-only map
            tensors = {name: reader.get(name).clone() for name in reader.names()}
            shards = [stack.enter_context(_shard_reader(path, n)) for n in body.get("shards", [])]
            state = decode_state(body["state"], tensors, _joiner(path, shards) if shards else None)
        for key in ("step", "epoch", "index"):
            if not isinstance(state.get(key), int):
                raise ValueError(f"{key!r} is missing or not an integer")
    except SafetensorsError as err:
        raise CheckpointError(f"{path}: cannot read the checkpoint: {err}") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(
            f"{state_file}: malformed checkpoint state ({type(err).__name__}: {err})"
        ) from None
    return str(body.get("run_id", "")), state
