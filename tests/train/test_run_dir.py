"""The output directory a run owns, and resuming from it: a user's files are never
overwritten, two runs never share a directory, and checkpoints hold no pickle."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from qlora import LoraConfig, add_lora
from qlora.config import TrainConfig, load_run_config
from qlora.train.checkpoint import decode_state, encode_state, load_checkpoint
from qlora.train.run_dir import LOCK_FILE, MARKER_FILE, OutputDirError, claim_output_dir
from qlora.train.trainer import TrainingError, train
from tests.tiny_models import tiny_llama

VOCAB = 96


def _model(r: int = 4, targets: str | list[str] = "all-linear") -> torch.nn.Module:
    model = tiny_llama(vocab=VOCAB, seed=0)
    add_lora(model, LoraConfig(r=r, alpha=8, dropout=0.0, target_modules=targets))
    return model


def _batches(n: int = 4) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (2, 12), generator=gen)
        labels = ids.clone()
        labels[:, :3] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


def _config(out: Path, **kw) -> TrainConfig:
    return TrainConfig(output_dir=str(out), **{"max_steps": 6, "save_every": 2,
                                               "warmup_steps": 0, **kw})  # fmt: skip


def _steps(out: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*") if p.is_dir())


def _losses(out: Path) -> list[float]:
    rows = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    return [r["loss"] for r in rows if "loss" in r]


# -- 1. a directory the run owns ----------------------------------------------------------------


def test_a_folder_with_the_users_files_is_refused_and_left_alone(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("mine\n")
    with pytest.raises(OutputDirError, match=r"not a qlora run's \(config.yaml\)"):
        train(_model(), _config(tmp_path), _batches(), progress=False)
    with pytest.raises(OutputDirError, match="not a qlora run's"):
        train(_model(), _config(tmp_path), _batches(), overwrite=True, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["config.yaml"]
    assert (tmp_path / "config.yaml").read_text() == "mine\n"


def test_recipe_refuses_dot_and_empty_output_dir_before_loading_a_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qlora.config import ConfigError
    from qlora.recipe import run_training

    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.yaml").write_text("mine\n")
    (tmp_path / "data.jsonl").write_text('{"text": "hello"}\n')
    config = load_run_config(
        None, ["train.output_dir=.", "model.source=/nonexistent", "data.path=data.jsonl"]
    )
    with pytest.raises(OutputDirError, match=r"not a qlora run's \(config.yaml, data.jsonl\)"):
        run_training(config, progress=False)
    with pytest.raises(ConfigError, match=r"train\.output_dir must be a directory name"):
        load_run_config(None, ["train.output_dir=''"])
    with pytest.raises(OutputDirError, match="output_dir is empty"):  # the library call
        claim_output_dir("")
    assert sorted(os.listdir(tmp_path)) == ["config.yaml", "data.jsonl"]
    assert (tmp_path / "config.yaml").read_text() == "mine\n"


def test_an_earlier_runs_checkpoints_need_resume_or_overwrite(tmp_path: Path) -> None:
    train(_model(), _config(tmp_path, max_steps=10), _batches(), progress=False)
    assert _steps(tmp_path) == [6, 8]
    with pytest.raises(
        OutputDirError, match=r"checkpoints \(checkpoint-6, checkpoint-8\).*--resume"
    ):
        train(_model(), _config(tmp_path), _batches(), progress=False)
    assert _steps(tmp_path) == [6, 8]
    # --overwrite starts over: the earlier run's checkpoints go, the new run's are kept and
    # pruned as it goes, and `latest` names one of them.
    train(_model(), _config(tmp_path, max_steps=7), _batches(), overwrite=True, progress=False)
    assert _steps(tmp_path) == [4, 6]
    assert (tmp_path / "latest").read_text().strip() == "checkpoint-6"
    assert len(_losses(tmp_path)) == 7


def test_pruning_and_resuming_ignore_another_runs_checkpoints(tmp_path: Path) -> None:
    other = tmp_path / "other"
    train(_model(), _config(other, max_steps=10), _batches(), progress=False)
    mine = tmp_path / "mine"
    train(_model(), _config(mine, max_steps=5), _batches(), progress=False)
    os.rename(other / "checkpoint-8", mine / "checkpoint-80")  # a stranger's, higher step
    result = train(_model(), _config(mine, max_steps=9), _batches(), resume=True, progress=False)
    assert result.steps == 9
    assert _steps(mine) == [6, 8, 80]  # ours pruned to two, the stranger's untouched


def test_a_second_training_into_a_locked_directory_names_the_holder(tmp_path: Path) -> None:
    with claim_output_dir(tmp_path / "run") as held:
        assert (held.path / LOCK_FILE).read_text().strip() == str(os.getpid())
        with pytest.raises(
            OutputDirError, match=rf"in use by another training run \(pid {os.getpid()}\)"
        ):
            train(_model(), _config(tmp_path / "run"), _batches(), progress=False)
    train(_model(), _config(tmp_path / "run", max_steps=1), _batches(), resume=True, progress=False)


def test_new_directories_follow_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        train(_model(), _config(tmp_path / "run", max_steps=2, save_every=1), _batches(),
              progress=False)  # fmt: skip
    finally:
        os.umask(old)
    assert (tmp_path / "run" / "checkpoint-1").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "run" / "checkpoint-1" / "state.json").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "run" / "metrics.jsonl").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "run" / MARKER_FILE).stat().st_mode & 0o777 == 0o640


# -- 2. resuming --------------------------------------------------------------------------------


def test_resume_falls_back_to_the_newest_readable_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    full = tmp_path / "full"
    train(_model(), _config(full, max_steps=8), _batches(), progress=False)
    run = tmp_path / "run"
    train(_model(), _config(run, max_steps=5), _batches(), progress=False)
    assert _steps(run) == [2, 4]
    (run / "checkpoint-4" / "tensors.safetensors").write_bytes(b"\x00" * 7)  # corrupt
    capsys.readouterr()
    train(_model(), _config(run, max_steps=8), _batches(), resume=True, progress=False)
    err = capsys.readouterr().err
    assert "skipping checkpoint-4" in err and "resuming from checkpoint-2 (step 2 of 8)" in err
    assert _losses(run) == pytest.approx(_losses(full), abs=1e-6)


def test_resume_without_any_readable_checkpoint_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    train(_model(), _config(tmp_path / "new", max_steps=1), _batches(), resume=True,
          progress=False)  # fmt: skip
    assert "no checkpoint in" in capsys.readouterr().err
    run = tmp_path / "run"
    train(_model(), _config(run, max_steps=3), _batches(), progress=False)
    (run / "checkpoint-2" / "state.json").write_text("{not json")
    with pytest.raises(TrainingError, match=r"no readable checkpoint in .*malformed checkpoint"):
        train(_model(), _config(run), _batches(), resume=True, progress=False)


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_a_pickle_payload_in_a_checkpoint_is_never_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(_model(), _config(run, max_steps=3), _batches(), progress=False)
    marker = tmp_path / "marker"
    crafted = run / "checkpoint-2"
    for name in os.listdir(crafted):
        (crafted / name).unlink()
    (crafted / "state.pt").write_bytes(pickle.dumps({"step": _Payload(marker)}))
    with pytest.raises(TrainingError, match="pickle checkpoint"):
        train(_model(), _config(run), _batches(), resume=True, progress=False)
    assert not marker.exists()


def test_state_round_trips_through_json_and_tensors() -> None:
    state = {
        "python": (3, tuple(range(5)), None),
        "optimizer": {
            "state": {0: {"step": torch.tensor(2.0)}},
            "param_groups": [{"betas": (0.9, 0.99)}],
        },
        "nan": float("nan"),
    }
    tensors: dict[str, torch.Tensor] = {}
    text = json.dumps(encode_state(state, tensors))
    back = decode_state(json.loads(text), tensors)
    assert back["python"] == state["python"]
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.99)
    assert back["optimizer"]["state"][0]["step"] is tensors["optimizer/state/0/step"]
    assert back["nan"] != back["nan"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"r": 8}, r"lora.r \(or the base model\) changed"),
        ({"targets": ["q_proj"]}, r"lora.target_modules \(or the base model\) changed"),
    ],
)
def test_resume_after_changing_the_adapters_is_a_clear_error(
    tmp_path: Path, change: dict, message: str
) -> None:
    train(_model(), _config(tmp_path, max_steps=3), _batches(), progress=False)
    with pytest.raises(TrainingError, match=message):
        train(_model(**change), _config(tmp_path), _batches(), resume=True, progress=False)


def test_resume_with_another_optimizer_is_a_clear_error(tmp_path: Path) -> None:
    train(_model(), _config(tmp_path, max_steps=3), _batches(), progress=False)
    with pytest.raises(
        TrainingError, match=r"train.optim=adamw, this run has train.optim=adamw8bit"
    ):
        train(_model(), _config(tmp_path, optim="adamw8bit"), _batches(), resume=True,
              progress=False)  # fmt: skip


def test_checkpoint_files_are_safetensors_and_json(tmp_path: Path) -> None:
    train(_model(), _config(tmp_path, max_steps=3), _batches(), progress=False)
    assert sorted(os.listdir(tmp_path / "checkpoint-2")) == ["state.json", "tensors.safetensors"]
    run_id, state = load_checkpoint(tmp_path / "checkpoint-2")
    assert run_id == json.loads((tmp_path / MARKER_FILE).read_text())["run_id"]
    assert state["step"] == 2 and set(state["trainable"]) == {
        n for n, p in _model().named_parameters() if p.requires_grad
    }
