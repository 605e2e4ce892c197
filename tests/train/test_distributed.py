"""Distributed training with two real processes (torchrun, gloo on the CPU).

Every test launches `tests.train.dist_child` under ``python -m torch.distributed.run
--standalone`` (a rendezvous on 127.0.0.1 with a free port) and compares it with the same
run in one process holding the whole global batch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qlora.models.safetensors_io import SafetensorsReader
from qlora.train.checkpoint import checkpoint_dirs, load_checkpoint

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="this torch has no torch.distributed"
)
ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 300  # seconds: a hung collective ends the test, not CI


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)  # the world-1 reference must not think it is a rank
    return env


def _run(out: Path, world: int, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    child = ["-m", "tests.train.dist_child", str(out), *args]
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}"]
    command = [sys.executable, *(launcher if world > 1 else []), *child]
    done = subprocess.run(
        command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=TIMEOUT
    )
    if check and done.returncode != 0:
        tail = f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
        raise AssertionError(f"{' '.join(command)} failed:\n{tail}")
    return done


def _result(out: Path, rank: int = 0) -> tuple[list[float], dict[str, torch.Tensor], dict]:
    record = json.loads((out / f"rank-{rank}.json").read_text())
    losses = [h["loss"] for h in record["history"] if "loss" in h]
    with SafetensorsReader(out / f"rank-{rank}.safetensors") as reader:
        tensors = {name: reader.get(name).clone() for name in reader.names()}
    return losses, tensors, record


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= atol, worst


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_ddp_world_2_equals_world_1_with_the_same_global_batch(tmp_path: Path, quant: str) -> None:
    _run(tmp_path / "w1", 1, "--batch", "4", "--steps", "4", "--quant", quant, "--eval")
    _run(tmp_path / "w2", 2, "--batch", "2", "--steps", "4", "--quant", quant, "--eval")
    losses1, adapters1, record1 = _result(tmp_path / "w1")
    losses2, adapters2, record2 = _result(tmp_path / "w2")
    assert record2["world"] == 2 and len(losses2) == 4
    assert losses1[-1] < losses1[0]  # it trains
    assert max(abs(x - y) for x, y in zip(losses1, losses2, strict=True)) <= 1e-5
    _assert_close(adapters1, adapters2, 1e-5)
    assert abs(record1["eval_loss"] - record2["eval_loss"]) <= 1e-5
    _, adapters_rank1, record_rank1 = _result(tmp_path / "w2", rank=1)
    _assert_close(adapters2, adapters_rank1, 0.0)  # the ranks hold identical adapters
    # every rank saw the global loss (times and memory are each rank's own)
    global_keys = ("step", "loss", "grad_norm", "eval_loss")
    assert [{k: h.get(k) for k in global_keys} for h in record_rank1["history"]] == [
        {k: h.get(k) for k in global_keys} for h in record2["history"]
    ]
    # rank 0 alone wrote the run's files
    assert (tmp_path / "w2" / "metrics.jsonl").read_text().count("\n") == 5  # 4 steps + eval
    assert (tmp_path / "w2" / "loss.png").is_file()


@pytest.mark.parametrize(
    ("parallel", "quant"),
    [("ddp", "nf2"), ("ddp", "int8"), ("fsdp", "nf2"), ("fsdp", "int8"), ("fsdp", "none")],
)
def test_accumulation_and_checkpointing_on_other_bases(
    tmp_path: Path, parallel: str, quant: str
) -> None:
    """Two micro-batches a step (one reduction), non-reentrant checkpointing, each base."""
    common = ("--accum", "2", "--steps", "2", "--quant", quant, "--grad-ckpt")
    _run(tmp_path / "w1", 1, "--batch", "4", *common)
    _run(tmp_path / "w2", 2, "--batch", "2", "--parallel", parallel, *common)
    losses1, adapters1, _ = _result(tmp_path / "w1")
    losses2, adapters2, record = _result(tmp_path / "w2")
    tolerance = 1e-5 if parallel == "ddp" else 1e-4  # the bounds for each
    assert max(abs(x - y) for x, y in zip(losses1, losses2, strict=True)) <= tolerance
    _assert_close(adapters1, adapters2, tolerance)
    if parallel == "fsdp" and quant != "none":
        assert record["packed_equal_after_gather"] is True


def test_sigkill_of_one_rank_then_resume_continues_identically(tmp_path: Path) -> None:
    args = ("--batch", "2", "--steps", "6", "--save-every", "2")
    _run(tmp_path / "whole", 2, *args)
    # rank 1 dies while fetching step 5's batch: checkpoints 2 and 4 exist, 4 is whole
    killed = _run(tmp_path / "run", 2, *args, "--kill-at-batch", "5", check=False)
    assert killed.returncode != 0
    assert [step for step, _ in checkpoint_dirs(tmp_path / "run")] == [2, 4]
    _run(tmp_path / "run", 2, *args, "--resume")
    whole_losses, whole_adapters, _ = _result(tmp_path / "whole")
    losses, adapters, _ = _result(tmp_path / "run")
    assert losses == whole_losses  # the history up to step 4 comes from the checkpoint
    _assert_close(adapters, whole_adapters, 0.0)


def test_a_world_2_checkpoint_resumes_at_world_1(tmp_path: Path) -> None:
    _run(tmp_path / "whole", 2, "--batch", "2", "--steps", "4")
    _run(tmp_path / "run", 2, "--batch", "2", "--steps", "2", "--save-every", "1")
    _, state = load_checkpoint(checkpoint_dirs(tmp_path / "run")[-1][1])
    assert state["world_size"] == 2 and state["global_batch"] == 4
    assert len(state["rng_ranks"]) == 2
    # at world 1 the global batch must stay 4: a batch of 2 is refused with the fix
    refused = _run(tmp_path / "run", 1, "--batch", "2", "--steps", "4", "--resume", check=False)
    assert refused.returncode != 0 and "train.batch_size=4" in refused.stderr
    _run(tmp_path / "run", 1, "--batch", "4", "--steps", "4", "--resume")
    whole_losses, whole_adapters, _ = _result(tmp_path / "whole")
    losses, adapters, _ = _result(tmp_path / "run")
    assert max(abs(x - y) for x, y in zip(losses, whole_losses, strict=True)) <= 1e-5
    _assert_close(adapters, whole_adapters, 1e-5)


def _fsdp_2_against_world_1(tmp_path: Path, *common: str) -> tuple[dict, dict, dict]:
    """World 1 with batch 4 and FSDP world 2 with batch 2 a rank: their losses and adapters
    agree within 1e-4. Returns world 1's record, world 2's adapters and rank 0's record."""
    _run(tmp_path / "w1", 1, "--batch", "4", *common)
    _run(tmp_path / "w2", 2, "--batch", "2", "--parallel", "fsdp", *common)
    losses1, adapters1, record1 = _result(tmp_path / "w1")
    losses2, adapters2, record2 = _result(tmp_path / "w2")
    assert max(abs(x - y) for x, y in zip(losses1, losses2, strict=True)) <= 1e-4
    _assert_close(adapters1, adapters2, 1e-4)
    return record1, adapters2, record2


def test_fsdp_world_2_shards_the_packed_base_and_equals_world_1(tmp_path: Path) -> None:
    common = ("--steps", "3", "--quant", "nf4", "--hidden", "512", "--eval")
    record1, adapters2, record2 = _fsdp_2_against_world_1(tmp_path, *common)
    assert abs(record1["eval_loss"] - record2["eval_loss"]) <= 1e-4
    for rank in (0, 1):
        _, adapters_rank, record = _result(tmp_path / "w2", rank)
        _assert_close(adapters2, adapters_rank, 0.0)
        # each rank holds about half of the frozen base, as its packed bytes
        assert record["resident_frozen_bytes"] <= 0.55 * record1["resident_frozen_bytes"]
        # the gathered codes and scales are the loaded bytes, bit for bit
        assert record["packed_equal_after_gather"] is True
        steps = [h for h in record["history"] if "loss" in h]
        # what travelled: measured per step, against the same gathers with a bf16 base
        assert all(0 < h["allgather_vs_bf16"] <= 0.3 for h in steps), steps
        assert all(h["allgather_mb"] > 0 for h in steps)


def test_fsdp_loads_each_layer_straight_into_shards(tmp_path: Path) -> None:
    from tests.tiny_models import tiny_llama

    # 12 layers: the checkpoint lists them as layers.0, layers.1, layers.10 ...
    model = tiny_llama(vocab=96, seed=0, layers=12, hidden=128, intermediate=256, tied=True)
    model.save_pretrained(tmp_path / "base")
    common = ("--steps", "3", "--quant", "nf4", "--load-from", str(tmp_path / "base"))
    # the adapters drawn before loading equal add_lora's after it: the runs agree
    record1, _, _ = _fsdp_2_against_world_1(tmp_path, *common)
    for rank in (0, 1):
        _, _, record = _result(tmp_path / "w2", rank)
        # while loading, a rank held its half of the layers loaded so far, one whole layer
        # (the one being sharded) and the unsharded rest (embedding, norms): never the model
        ratio = record["held_at_load"] / record1["held_at_load"]
        print(f"rank {rank}: held {ratio:.3f}x the whole model at most while loading")
        assert ratio <= 0.5 + 1 / 12 + 0.05, ratio
        assert record["resident_frozen_bytes"] <= 0.55 * record1["resident_frozen_bytes"]


def test_fsdp_sigkill_resume_and_resume_at_world_1(tmp_path: Path) -> None:
    args = ("--batch", "2", "--steps", "6", "--save-every", "2", "--parallel", "fsdp")
    _run(tmp_path / "whole", 2, *args)
    killed = _run(
        tmp_path / "run", 2, *args, "--kill-at-batch", "5", "--kill-rank", "0", check=False
    )
    assert killed.returncode != 0
    assert [step for step, _ in checkpoint_dirs(tmp_path / "run")] == [2, 4]
    newest = checkpoint_dirs(tmp_path / "run")[-1][1]
    _, state = load_checkpoint(newest)
    whole_losses, whole_adapters, _ = _result(tmp_path / "whole")
    # each rank wrote its own row blocks of the adapters and moments; none went to rank 0
    shards = [newest / f"shard-0000{r}-of-00002.safetensors" for r in (0, 1)]
    with SafetensorsReader(shards[0]) as first, SafetensorsReader(shards[1]) as second:
        for name, full in state["trainable"].items():
            rows = first.get(f"trainable/{name}").shape[0], second.get(f"trainable/{name}").shape[0]
            assert rows == (-(-full.shape[0] // 2), full.shape[0] // 2), name
    with SafetensorsReader(newest / "tensors.safetensors") as rank_0:
        assert not any(key.startswith("trainable/") for key in rank_0.names())
    # reading joins them: full tensors with the model's shapes
    assert all(t.shape[0] > 0 for t in state["trainable"].values())
    # the same run on one process from the FSDP checkpoint (batch 4 = the global batch)
    _run(tmp_path / "run", 1, "--batch", "4", "--steps", "6", "--save-every", "2", "--resume")
    losses, adapters, _ = _result(tmp_path / "run")
    assert max(abs(x - y) for x, y in zip(losses, whole_losses, strict=True)) <= 1e-4
    _assert_close(adapters, whole_adapters, 1e-4)
    # and at world 2 again, FSDP, from the same checkpoint: identical to the uninterrupted run
    _run(tmp_path / "run", 2, *args, "--resume")
    losses, adapters, _ = _result(tmp_path / "run")
    assert losses == whole_losses
    _assert_close(adapters, whole_adapters, 0.0)


def test_bad_parallel_settings_are_refused(tmp_path: Path) -> None:
    from qlora.train.parallel import Distributed, ParallelError, _resolve_mode

    assert _resolve_mode("auto", 2) == "ddp" and _resolve_mode("none", 1) == "none"
    with pytest.raises(ParallelError, match=r"train\.parallel=ddp"):
        _resolve_mode("none", 2)
    place = Distributed()
    assert place.all_reduce_sum([1.5, 2]) == [1.5, 2.0] and place.gather(3) == [3]
    # fsdp keeps torch's AdamW on sharded parameters; another optimizer is refused up front
    from qlora import LoraConfig, add_lora
    from qlora.config import TrainConfig
    from qlora.train.trainer import TrainingError, _Run
    from tests.tiny_models import tiny_llama

    model = tiny_llama(vocab=96, seed=0)
    add_lora(model, LoraConfig(r=2))
    config = TrainConfig(output_dir=str(tmp_path), optim="adamw8bit", max_steps=1)
    sharded = Distributed(rank=1, world_size=2, mode="fsdp")
    batch = {"input_ids": torch.zeros(1, 4, dtype=torch.long)}
    batch["labels"] = batch["input_ids"]
    with pytest.raises(TrainingError, match=r"train\.parallel=fsdp works with train\.optim=adamw"):
        _Run(model, config, [batch], None, None, False, sharded)
    assert place.broadcast("x") == "x" and place.is_main and not place.active


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_torchrun_qlora_train_on_the_default_model(tmp_path: Path, parallel: str) -> None:
    """The real thing: ``torchrun -m qlora train`` (the recipe) with the default model, nf4."""
    from tests.default_model import default_model_or_skip, task_train_file

    default_model_or_skip()
    task_train_file(tmp_path, 8)
    run = tmp_path / "run"
    overrides = [
        f"data.path={tmp_path / 'train.jsonl'}",
        f"train.output_dir={run}",
        "train.batch_size=1",
        "train.max_steps=2",
        "train.warmup_steps=0",
        "train.save_every=1",
        f"train.parallel={parallel}",
    ]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        "-m", "qlora", "train", *(arg for o in overrides for arg in ("--set", o)),
    ]  # fmt: skip
    done = subprocess.run(
        command, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=TIMEOUT
    )
    assert done.returncode == 0, done.stderr[-6000:]
    assert done.stdout.count("trained 2 steps") == 1  # rank 0 speaks for the job
    assert done.stdout.count("trainable params") == 1
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]  # one writer
    assert [r["step"] for r in rows if "eval_loss" in r] == [2]  # data.eval_fraction's share
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "config.yaml").is_file() and (run / "loss.png").is_file()
    _, state = load_checkpoint(checkpoint_dirs(run)[-1][1])
    assert state["world_size"] == 2 and state["global_batch"] == 2
    with SafetensorsReader(run / "adapter" / "adapter_model.safetensors") as reader:
        shapes = {reader.get(name).shape for name in reader.names() if "q_proj.lora_A" in name}
    assert shapes == {torch.Size([16, 576])}  # whole adapters, also from FSDP's shards
    if parallel == "fsdp":
        steps = [r for r in rows if "loss" in r]
        moved = [(round(r["allgather_mb"], 1), round(r["allgather_vs_bf16"], 3)) for r in steps]
        print("default model, fsdp: all-gathered MiB per step, and against a bf16 base:", moved)
