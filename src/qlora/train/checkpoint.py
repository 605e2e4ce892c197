"""Resumable training checkpoints, written atomically.

A checkpoint is a directory ``checkpoint-<step>/`` with one ``state.pt``: the trainable
parameters (by name), the optimizer and scheduler states, every RNG state (Python, torch
CPU, CUDA) and the data cursor (epoch, batch index). It is written into
``checkpoint-<step>.tmp`` and renamed into place, and ``latest`` (a one-line file naming
the newest directory) is replaced atomically after that, so a run killed at any instant -
SIGKILL included - leaves the previous checkpoint intact and pointed to.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["latest_checkpoint", "load_checkpoint", "rng_state", "save_checkpoint", "set_rng_state"]

_KEEP = 2  # checkpoints kept on disk (the newest ones)


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


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(output_dir: Path, step: int, state: dict[str, Any]) -> Path:
    """Write ``state`` as ``output_dir/checkpoint-<step>`` atomically; prune old ones."""
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f"checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with open(tmp / "state.pt", "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = output_dir / "latest.tmp"
    pointer.write_text(final.name + "\n")
    os.replace(pointer, output_dir / "latest")
    kept = sorted(
        (p for p in output_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
    )
    for old in kept[:-_KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The checkpoint ``latest`` names, or None when there is none."""
    pointer = output_dir / "latest"
    if not pointer.is_file():
        return None
    path = output_dir / pointer.read_text().strip()
    return path if (path / "state.pt").is_file() else None


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        # mmap: tensors are read from the file as they are copied into place, so resuming
        # does not hold a second copy of (possibly paged, large) optimizer state in memory
        return torch.load(path / "state.pt", map_location="cpu", weights_only=False, mmap=True)
    except (OSError, RuntimeError, EOFError) as err:
        raise RuntimeError(
            f"{path / 'state.pt'}: cannot read the checkpoint ({err}); delete it to resume "
            "from the previous one"
        ) from None
