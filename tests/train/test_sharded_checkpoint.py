"""FSDP checkpoints: each rank writes its row blocks; reading joins them into full tensors.

One process, a gloo group of world 1 on a file store (no network), writes a real sharded
checkpoint of DTensors; the two-rank layout is then made from it by splitting the shard
file by rows, as two ranks would have written it. The two-process runs that write and
resume such checkpoints (after a SIGKILL, at another world size) are in
test_distributed.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from qlora.models.safetensors_io import SafetensorsReader, write_safetensors
from qlora.train.checkpoint import (
    CheckpointError,
    load_checkpoint,
    save_sharded_checkpoint,
)
from qlora.train.parallel import Distributed

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="no torch.distributed")


@pytest.fixture
def place(world_of_one: None) -> Distributed:
    return Distributed(rank=0, world_size=1, mode="fsdp")


def _state() -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))
    generator = torch.Generator().manual_seed(0)
    a, moment = torch.randn(5, 3, generator=generator), torch.randn(5, 3, generator=generator)
    return {
        "trainable": {"lora_A": distribute_tensor(a, mesh, [Shard(0)])},
        "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": moment}}},
        "rng": {"torch": torch.get_rng_state()},
        "step": 4,
        "epoch": 0,
        "index": 4,
    }


def test_a_sharded_checkpoint_round_trips(tmp_path: Path, place: Distributed) -> None:
    state = _state()
    path = save_sharded_checkpoint(tmp_path / "out", 4, state, "run-1", place)
    assert sorted(p.name for p in path.iterdir()) == [
        "shard-00000-of-00001.safetensors",
        "state.json",
        "tensors.safetensors",
    ]
    assert (tmp_path / "out" / "latest").read_text() == "checkpoint-4\n"
    body = json.loads((path / "state.json").read_text())
    assert body["state"]["trainable"]["lora_A"] == {
        "__sharded__": "trainable/lora_A",
        "shape": [5, 3],
    }
    with SafetensorsReader(path / "tensors.safetensors") as reader:
        assert "trainable/lora_A" not in reader.names()  # only in the shard file
    run_id, back = load_checkpoint(path)
    assert run_id == "run-1" and back["step"] == 4
    assert torch.equal(back["trainable"]["lora_A"], state["trainable"]["lora_A"].full_tensor())
    assert torch.equal(
        back["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"]
    )


def _split(path: Path, rows: list[int]) -> None:
    """Rewrite ``path``'s one shard as len(rows) ranks' row blocks (some may be empty)."""
    with SafetensorsReader(path / "shard-00000-of-00001.safetensors") as reader:
        full = {name: reader.get(name).clone() for name in reader.names()}
    (path / "shard-00000-of-00001.safetensors").unlink()
    names = [f"shard-{r:05d}-of-{len(rows):05d}.safetensors" for r in range(len(rows))]
    for name, block in zip(names, range(len(rows)), strict=True):
        start = sum(rows[:block])
        pieces = {k: v[start : start + rows[block]] for k, v in full.items()}
        write_safetensors(path / name, pieces)
    body = json.loads((path / "state.json").read_text())
    body["shards"] = names
    (path / "state.json").write_text(json.dumps(body))


def test_row_blocks_of_several_ranks_join_in_rank_order(tmp_path: Path, place: Distributed) -> None:
    state = _state()
    path = save_sharded_checkpoint(tmp_path, 4, state, "run-1", place)
    _split(path, [3, 2, 0])  # torch.chunk's layout: the last rank may hold nothing
    _, back = load_checkpoint(path)
    assert torch.equal(back["trainable"]["lora_A"], state["trainable"]["lora_A"].full_tensor())


def test_a_missing_or_short_shard_is_refused_by_name(tmp_path: Path, place: Distributed) -> None:
    path = save_sharded_checkpoint(tmp_path, 4, _state(), "run-1", place)
    _split(path, [3, 2])
    (path / "shard-00001-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"shard-00001-of-00002.safetensors is missing"):
        load_checkpoint(path)
    write_safetensors(
        path / "shard-00001-of-00002.safetensors", {"trainable/lora_A": torch.zeros(1, 3)}
    )
    with pytest.raises(CheckpointError, match=r"trainable/lora_A: the shards join to \[4, 3\]"):
        load_checkpoint(path)


def _full_disk(path: Path, *args: object, **kwargs: object) -> None:
    raise OSError(28, "No space left on device", str(path))


def test_a_failed_shard_write_publishes_nothing(
    tmp_path: Path, place: Distributed, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint = sys.modules[save_sharded_checkpoint.__module__]
    monkeypatch.setattr(checkpoint, "write_safetensors", _full_disk)
    with pytest.raises(CheckpointError, match=r"checkpoint-4 was not written: rank 0: .*No space"):
        save_sharded_checkpoint(tmp_path, 4, _state(), "run-1", place)
    assert list(tmp_path.iterdir()) == [tmp_path / "store"]  # no checkpoint, no staging left


def test_a_failed_write_of_rank_0s_own_files_publishes_nothing(
    tmp_path: Path, place: Distributed, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shard is written, then rank 0's state.json fails: no checkpoint directory."""
    checkpoint = sys.modules[save_sharded_checkpoint.__module__]
    monkeypatch.setattr(checkpoint, "atomic_write", _full_disk)
    with pytest.raises(CheckpointError, match=r"checkpoint-4 was not written: rank 0: .*No space"):
        save_sharded_checkpoint(tmp_path, 4, _state(), "run-1", place)
    assert list(tmp_path.iterdir()) == [tmp_path / "store"]
