"""`qlora serve`'s command line: flags, wiring to the engine, one-line errors (no network)."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qlora import cli
from qlora.serve import BatchingEngine, SequentialEngine
from tests.export.conftest import tiny_tokenizer
from tests.serve.conftest import make_adapter, make_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny")
    tokenizer = tiny_tokenizer()
    make_model(tokenizer).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """Replaces the blocking server with a recorder of what it was given (and gives torch its
    thread count back: `qlora serve` sets it for the process)."""
    import torch

    import qlora.serve.app

    seen: dict[str, Any] = {}

    def fake_run(engine: Any, **kwargs: Any) -> None:
        seen.update(engine=engine, **kwargs)
        engine.close()

    monkeypatch.setattr(qlora.serve.app, "run_server", fake_run)
    threads = torch.get_num_threads()
    yield seen
    torch.set_num_threads(threads)


def test_defaults_bind_localhost() -> None:
    args = cli.build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.adapter) == ("127.0.0.1", 8000, [])
    assert args.max_batch == 8


@pytest.mark.parametrize(
    "flags",
    [["--adapter", "no-name"], ["--adapter", "=x"], ["--port", "99999"], ["--max-batch", "0"]],
)
def test_bad_flags_are_argparse_errors(flags: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as stop:
        cli.build_parser().parse_args(["serve", *flags])
    assert stop.value.code == 2
    assert flags[-1] in capsys.readouterr().err


def test_serve_wires_model_adapters_and_key(
    tiny_dir: Path, tmp_path: Path, captured: dict[str, Any]
) -> None:
    adapter = make_adapter(tiny_tokenizer(), tmp_path / "a", seed=3)
    argv = ["serve", "--model", str(tiny_dir), "--adapter", f"mine={adapter}"]
    assert cli.main([*argv, "--port", "0", "--api-key", "k"]) == 0
    assert [m.name for m in captured["engine"].models()] == [str(tiny_dir), "mine"]
    assert (captured["host"], captured["port"], captured["api_key"]) == ("127.0.0.1", 0, "k")
    assert isinstance(captured["engine"], BatchingEngine) and captured["engine"].max_batch == 8


def test_max_batch_and_threads_reach_the_engine(
    tiny_dir: Path, captured: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    threads: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    argv = ["serve", "--model", str(tiny_dir), "--max-batch", "3", "--threads", "1"]
    assert cli.main(argv) == 0
    assert captured["engine"].max_batch == 3
    assert threads == [1]


def test_an_architecture_without_batching_is_served_one_at_a_time(
    tmp_path: Path, captured: dict[str, Any], capsys: pytest.CaptureFixture
) -> None:
    import transformers

    tokenizer = tiny_tokenizer()
    config = transformers.GPT2Config(
        n_embd=32, n_layer=1, n_head=2, vocab_size=len(tokenizer), n_positions=64
    )
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert cli.main(["serve", "--model", str(tmp_path), "--quant", "none"]) == 0
    assert isinstance(captured["engine"], SequentialEngine)
    assert "one request at a time (no batching for model_type 'gpt2'" in capsys.readouterr().out


def test_a_bad_adapter_is_one_line(
    tiny_dir: Path, tmp_path: Path, captured: dict[str, Any], capsys: pytest.CaptureFixture
) -> None:
    argv = ["serve", "--model", str(tiny_dir), "--adapter", f"x={tmp_path / 'missing'}"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert (
        err
        == f"qlora serve: error: --adapter x={tmp_path / 'missing'}: no such adapter directory\n"
    )
    assert not captured


def test_an_adapter_that_does_not_fit_is_one_line(
    tiny_dir: Path, tmp_path: Path, captured: dict[str, Any], capsys: pytest.CaptureFixture
) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    argv = ["serve", "--model", str(tiny_dir), "--adapter", f"x={broken}"]
    assert cli.main(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("qlora serve: error: cannot load adapter 'x'") and str(broken) in last
    assert not captured


def test_missing_extra_names_the_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a)
    )
    assert cli.main(["serve"]) == 2
    assert 'pip install "qlora[serve]"' in capsys.readouterr().err
