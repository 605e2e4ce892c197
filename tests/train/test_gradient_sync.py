"""`gradient_sync`: with accumulation, DDP reduces once per optimizer step.

One process, a gloo group of world 1 on a file store (no network): DDP still runs its
reduction machinery, which a communication hook counts. (FSDP2 skips its reduce-scatter on
a world of 1; its accumulation is covered by the two-process parity tests.)
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from qlora.train.parallel import gradient_sync

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="no torch.distributed")


def _accumulate(module: nn.Module, micro_steps: int) -> None:
    for i in range(micro_steps):
        with gradient_sync(module, enabled=i == micro_steps - 1):
            module(torch.randn(3, 8)).sum().backward()


def test_ddp_reduces_only_on_the_last_micro_step(world_of_one: None) -> None:
    ddp = torch.nn.parallel.DistributedDataParallel(nn.Linear(8, 4))
    calls = []

    def count(state, bucket):  # type: ignore[no-untyped-def]  (DDP checks the annotations)
        calls.append(bucket.index())
        future: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        future.set_result(bucket.buffer())
        return future

    ddp.register_comm_hook(None, count)
    _accumulate(ddp, 3)
    assert len(calls) == 1  # one bucket, reduced once, on the last micro-step
    _accumulate(ddp, 1)
    assert len(calls) == 2
