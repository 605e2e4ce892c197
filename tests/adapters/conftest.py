"""Adapter tests run tiny models, where intra-op threads only cost: on a busy 2-core machine
OpenMP's spinning makes a 2-thread forward ~100x slower than a 1-thread one."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
