"""Fixtures of the training tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch.distributed as dist


@pytest.fixture
def world_of_one(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[None]:
    """A process group of this one process on a file store (no network): gloo, or NCCL for
    a test marked ``gpu``. Destroyed after the test."""
    if not dist.is_available():
        pytest.skip("this torch has no torch.distributed")
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    backend = "nccl" if request.node.get_closest_marker("gpu") else "gloo"
    store = f"file://{tmp_path / 'store'}"
    dist.init_process_group(backend, init_method=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
