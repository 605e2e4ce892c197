"""`train.cpu_offload`: FSDP's shards resting in host memory, on CUDA ranks only.

In one process with a world-1 group on a file store (no network): the trainer under FSDP
(a world of 1 still shards, gathers and reduces through FSDP2) against the plain trainer,
and on a GPU the same with the shards offloaded to the CPU. The refusals run everywhere.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from qlora import LoraConfig, QuantConfig, add_lora, quantize_model
from qlora.config import TrainConfig
from qlora.data import BatchLoader
from qlora.train.checkpoint import checkpoint_dirs
from qlora.train.fsdp import full_tensors
from qlora.train.parallel import Distributed, ParallelError, check_offload
from qlora.train.trainer import train
from tests.conftest import requires_cuda
from tests.tiny_models import tiny_llama
from tests.train.dist_child import VOCAB, examples

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="no torch.distributed")


def _train(
    out: Path, device: str, place: Distributed | None, offload: bool, save_every: int = 0
) -> tuple:
    model = quantize_model(tiny_llama(vocab=VOCAB, seed=0), QuantConfig(kind="nf4")).to(device)
    torch.manual_seed(1)
    add_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear"))
    with torch.no_grad():  # B random, so that A's gradients count from the first step
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(2)))
    config = TrainConfig(
        output_dir=str(out), batch_size=4, max_steps=4, lr=2e-3, warmup_steps=0,
        cpu_offload=offload, malloc_mmap_kb=0, save_every=save_every,
    )  # fmt: skip
    batches = list(BatchLoader(examples(), 4, 0, seed=3))
    kwargs = {"place": place} if place is not None else {}
    result = train(model, config, batches, progress=False, **kwargs)
    trained = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    where = {p.device.type for p in trained.values()}
    trained = {n: t.cpu() for n, t in full_tensors(trained).items()}
    return [h["loss"] for h in result.history if "loss" in h], trained, where


def _compare(a: tuple, b: tuple) -> None:
    assert max(abs(x - y) for x, y in zip(a[0], b[0], strict=True)) <= 1e-5
    assert max(float((a[1][k] - b[1][k]).abs().max()) for k in a[1]) <= 1e-5


def test_fsdp_on_a_world_of_one_equals_the_plain_trainer(
    tmp_path: Path, world_of_one: None
) -> None:
    plain = _train(tmp_path / "plain", "cpu", None, offload=False)
    fsdp = Distributed(mode="fsdp")
    sharded = _train(tmp_path / "fsdp", "cpu", fsdp, offload=False, save_every=1)
    _compare(plain, sharded)
    # sharded checkpoints are pruned like the others (the newest two kept)
    assert [step for step, _ in checkpoint_dirs(tmp_path / "fsdp")] == [2, 3]
    assert (tmp_path / "fsdp" / "checkpoint-3" / "shard-00000-of-00001.safetensors").is_file()


@requires_cuda
@pytest.mark.gpu
def test_cpu_offload_on_cuda_equals_fsdp_without_it(tmp_path: Path, world_of_one: None) -> None:
    place = Distributed(mode="fsdp", device=torch.device("cuda", 0))
    on_device = _train(tmp_path / "gpu", "cuda", place, offload=False)
    offloaded = _train(tmp_path / "offload", "cuda", place, offload=True)
    assert on_device[2] == {"cuda"} and offloaded[2] == {"cpu"}  # where the shards rest
    _compare(on_device, offloaded)


def test_cpu_offload_is_refused_where_it_cannot_work() -> None:
    with pytest.raises(ParallelError, match=r"needs train.parallel=fsdp under torchrun"):
        check_offload(True, Distributed())
    with pytest.raises(ParallelError, match=r"needs train.parallel=fsdp"):
        check_offload(True, Distributed(rank=0, world_size=2, mode="ddp"))
    with pytest.raises(ParallelError, match=r"these ranks run on cpu, whose shards are in host"):
        check_offload(True, Distributed(rank=0, world_size=2, mode="fsdp"))
    check_offload(False, Distributed())  # off: nothing to check
