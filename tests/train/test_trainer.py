"""The training loop on a tiny random Llama: learning, accumulation, metrics, the loss plot,
NaN handling and exact resumption after SIGKILL."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qlora import LoraConfig, add_lora
from qlora.config import TrainConfig
from qlora.train.trainer import TrainingError, train
from tests.tiny_models import tiny_llama

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 96


def _model(dropout: float = 0.0) -> torch.nn.Module:
    model = tiny_llama(vocab=VOCAB, seed=0)
    add_lora(model, LoraConfig(r=4, alpha=8, dropout=dropout))
    return model


def _batches(n: int, batch: int = 2, seed: int = 0, vocab: int = VOCAB) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch, 12), generator=gen)
        labels = ids.clone()
        labels[:, :3] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


def _losses(path: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


def test_learns_and_writes_metrics_and_plot(tmp_path: Path) -> None:
    model = _model()
    data = _batches(2)
    config = TrainConfig(output_dir=str(tmp_path), max_steps=30, lr=1e-2, warmup_steps=0,
                         eval_every=10)  # fmt: skip
    result = train(model, config, data, eval_data=data, progress=False)
    losses = _losses(tmp_path / "metrics.jsonl")
    assert result.steps == 30 and len(losses) == 30
    assert losses[-1] < 0.8 * losses[0]  # starts memorizing its two batches
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "memory_mb"} <= set(records[0])
    assert sum("eval_loss" in r for r in records) == 3
    assert (tmp_path / "loss.png").stat().st_size > 1000
    base = tiny_llama(vocab=VOCAB, seed=0)
    frozen = [(n.replace(".base_layer", ""), p) for n, p in model.named_parameters()
              if not p.requires_grad]  # fmt: skip
    changed = [n for n, p in frozen if not torch.equal(p, base.get_parameter(n))]
    assert changed == []  # the frozen base did not move


def test_accumulation_equals_one_big_batch(tmp_path: Path) -> None:
    big = _batches(1, batch=4)
    halves = [{k: v[:2] for k, v in big[0].items()}, {k: v[2:] for k, v in big[0].items()}]
    one, two = _model(), _model()
    cfg = dict(max_steps=1, lr=1e-2, warmup_steps=0, max_grad_norm=0.0)
    train(one, TrainConfig(output_dir=str(tmp_path / "a"), **cfg), big, progress=False)
    train(two, TrainConfig(output_dir=str(tmp_path / "b"), grad_accum=2, **cfg), halves,
          progress=False)  # fmt: skip
    for (name, a), b in zip(one.named_parameters(), two.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    model = _model()
    good = _batches(4, vocab=VOCAB - 1)  # never token VOCAB-1
    bad = copy.deepcopy(good[0])
    bad["input_ids"][0, 5] = VOCAB - 1
    with torch.no_grad():
        model.model.embed_tokens.weight[VOCAB - 1] = float("nan")
    config = TrainConfig(output_dir=str(tmp_path), max_steps=10, save_every=2, warmup_steps=0)
    with pytest.raises(TrainingError, match=r"step 5: the loss is nan.*checkpoint-4"):
        train(model, config, [*good, bad], progress=False)
    assert (tmp_path / "checkpoint-4" / "state.json").is_file()


def test_no_trainable_parameters_or_data_is_an_error(tmp_path: Path) -> None:
    config = TrainConfig(output_dir=str(tmp_path), max_steps=1)
    with pytest.raises(TrainingError, match="no trainable parameters"):
        train(tiny_llama(vocab=VOCAB).requires_grad_(False), config, _batches(1), progress=False)
    with pytest.raises(TrainingError, match="no batches"):
        train(_model(), config, [], progress=False)


def _child(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tests.train.resume_child", str(out), *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("optim", ["adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit"])
def test_sigkill_then_resume_gives_the_uninterrupted_losses(tmp_path: Path, optim: str) -> None:
    full = _child(tmp_path / "full", "--optim", optim)
    assert full.returncode == 0, full.stderr
    killed = _child(tmp_path / "killed", "--kill-at-batch", "15", "--optim", optim)  # step 8
    assert killed.returncode == -9, killed.stderr
    assert (tmp_path / "killed" / "latest").read_text().strip() == "checkpoint-6"
    resumed = _child(tmp_path / "killed", "--resume", "--optim", optim)
    assert resumed.returncode == 0, resumed.stderr
    expected = _losses(tmp_path / "full" / "metrics.jsonl")
    got = _losses(tmp_path / "killed" / "metrics.jsonl")
    assert len(expected) == len(got) == 10
    for step, (a, b) in enumerate(zip(expected, got, strict=True), start=1):
        assert abs(a - b) <= 1e-6, (step, a, b)


def test_ctrl_c_saves_the_last_completed_step_and_resume_gives_the_uninterrupted_losses(
    tmp_path: Path,
) -> None:
    full = _child(tmp_path / "full")
    assert full.returncode == 0, full.stderr
    stopped = _child(tmp_path / "stopped", "--interrupt-at-batch", "10")  # inside step 5
    assert stopped.returncode == 1
    last = stopped.stderr.strip().splitlines()[-1]
    assert "interrupted during step 5" in last and "checkpoint-4 (step 4)" in last, last
    assert "--resume" in last and "Traceback" not in stopped.stderr
    assert not list((tmp_path / "stopped").glob(".checkpoint-*"))  # nothing half-written
    resumed = _child(tmp_path / "stopped", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    expected = _losses(tmp_path / "full" / "metrics.jsonl")
    got = _losses(tmp_path / "stopped" / "metrics.jsonl")
    assert got == pytest.approx(expected, abs=1e-6)


def test_tensorboard_flag(tmp_path: Path) -> None:
    config = TrainConfig(output_dir=str(tmp_path), max_steps=2, tensorboard=True)
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(TrainingError, match="pip install tensorboard"):
            train(_model(), config, _batches(2), progress=False)
        return
    train(_model(), config, _batches(2), progress=False)
    assert any((tmp_path / "tensorboard").iterdir())


def test_optimizer_choice_and_paged_state_errors(tmp_path: Path) -> None:
    from qlora.config import ConfigError, load_run_config

    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  max_steps: 1\n")
    with pytest.raises(ConfigError, match="paged_adamw8bit"):  # lists the valid choices
        load_run_config(recipe, ["train.optim=sgd"])
    assert load_run_config(recipe, ["train.optim=adamw8bit"]).train.optim == "adamw8bit"
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    config = TrainConfig(output_dir=str(tmp_path / "out"), max_steps=1, optim="paged_adamw",
                         optim_dir=str(blocked / "state"))  # fmt: skip
    with pytest.raises(OSError, match=r"a-file/state: cannot create the paged optimizer state"):
        train(_model(), config, _batches(1), progress=False)
