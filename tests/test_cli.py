import argparse
import subprocess
import sys
from pathlib import Path
from typing import NoReturn

import pytest

import qlora
from qlora.cli import main


def test_version_and_env(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "c kernels" in out and "triton kernels" in out
    assert qlora.__version__ in out


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: qlora" in capsys.readouterr().out


def test_kernels_can_be_disabled_and_reference_path_is_used() -> None:
    code = (
        "import torch; from qlora.quant import quantize, dequantize, dequantize_reference;"
        "from qlora.kernels import c_extension; assert c_extension('cpu') is None;"
        "s = quantize(torch.randn(100, 64), 'nf4');"
        "assert torch.equal(dequantize(s, torch.bfloat16), dequantize_reference(s, torch.bfloat16))"
    )
    env = {"QLORA_DISABLE_KERNELS": "1", "PATH": ""}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


# -- choices and help come from the config dataclasses ---------------------------------------


def _option(command: str, flag: str) -> argparse.Action:
    from qlora.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub = commands.choices[command]
    return next(a for a in sub._actions if flag in a.option_strings)


def test_choices_and_help_are_read_off_the_config_dataclasses() -> None:
    from qlora.config import DataConfig, GenerationConfig, QuantConfig, field_doc
    from qlora.dtypes import DTYPE_NAMES
    from qlora.memory import OPTIMIZERS as ESTIMATE_OPTIMIZERS
    from qlora.optim import OPTIMIZERS
    from qlora.quant import KINDS
    from qlora.quant.codebooks import BASE_KINDS

    for command in ("generate", "chat", "merge", "eval"):
        quant = _option(command, "--quant")
        assert tuple(quant.choices) == (*BASE_KINDS, "none")
        assert field_doc(QuantConfig, "kind") in quant.help
    assert tuple(_option("quantize", "--quant").choices) == KINDS
    assert "--overwrite" in _option("quantize", "--overwrite").option_strings
    assert tuple(_option("eval", "--format").choices) == ("auto", "alpaca", "chat", "text")
    assert field_doc(DataConfig, "format") in _option("eval", "--format").help
    assert tuple(_option("estimate", "--compute-dtype").choices) == DTYPE_NAMES
    assert tuple(_option("estimate", "--optim").choices) == ESTIMATE_OPTIMIZERS
    assert (*OPTIMIZERS, "sgd") == ESTIMATE_OPTIMIZERS
    top_p = _option("generate", "--top-p")
    assert top_p.default == GenerationConfig().top_p
    assert field_doc(GenerationConfig, "top_p").replace("%", "%%") in top_p.help


# -- bad arguments fail before any model loads, argparse-style -------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", "hi", "--temperature", "-1"], "argument --temperature: temperature must "
                                                    "be >= 0 (0: greedy), got -1.0"),
        (["generate", "hi", "--top-p", "5"], "argument --top-p: top_p must be in (0, 1], got 5.0"),
        (["chat", "--max-new-tokens", "0"], "argument --max-new-tokens: max_new_tokens must be "
                                            "a positive integer, got 0"),
        (["generate", "hi", "--top-p", "x"], "argument --top-p: expected a number, got 'x'"),
        (["quantize", "a", "b", "--blocksize", "48"], "argument --blocksize: blocksize must be "
                                                      "one of 32, 64"),
        (["quantize", "a", "b", "--quant", "nf3"], "argument --quant: invalid choice: 'nf3'"),
        (["eval", "--data", "d.jsonl", "--batch-size", "0"], "argument --batch-size: "),
    ],
)  # fmt: skip
def test_bad_arguments_are_argparse_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    monkeypatch.setattr("qlora.cli._load", _no_model)
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert f"qlora {argv[0]}: error: {message}" in err
    assert "Traceback" not in err


def _no_model(*_: object, **__: object) -> NoReturn:
    raise AssertionError("the model must not load for a bad argument")


@pytest.mark.parametrize("argv", [["generate", "", "--raw"], ["generate", "  "]])
def test_empty_prompt_is_a_clear_error(
    argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    monkeypatch.setattr("qlora.cli._load", _no_model)
    assert main([*argv, "--quant", "none"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "qlora generate: error: the prompt is empty: give the text to continue"


# -- Ctrl-C ----------------------------------------------------------------------------------


def _interrupt(*_: object, **__: object) -> NoReturn:
    raise KeyboardInterrupt


@pytest.mark.parametrize("command", [["chat"], ["generate", "hi"]])
def test_ctrl_c_in_chat_and_generate_exits_quietly(
    command: list[str], capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    monkeypatch.setattr("qlora.cli._load", lambda args: (object(), object()))
    monkeypatch.setattr("qlora.generate.chat_loop", _interrupt)
    monkeypatch.setattr("qlora.generate.generate_text", _interrupt)
    assert main(command) == 130
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == "\n"


def _train_argv(tmp_path: Path) -> list[str]:
    data = tmp_path / "train.jsonl"
    data.write_text("")
    return ["train", "--set", f"data.path={data}", "--set", "train.max_steps=1"]


def test_ctrl_c_elsewhere_is_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch, tmp_path: Path
) -> None:
    monkeypatch.setattr("qlora.recipe.run_training", _interrupt)
    assert main(_train_argv(tmp_path)) == 130
    assert capsys.readouterr().err == "qlora train: interrupted\n"


def test_an_error_raised_for_ctrl_c_is_printed_and_exits_130(
    capsys: pytest.CaptureFixture[str], monkeypatch, tmp_path: Path
) -> None:
    from qlora.train import TrainingError

    def stopped(*_: object, **__: object) -> NoReturn:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as interrupt:
            message = "interrupted at step 3; nothing half-written. Continue: --resume"
            raise TrainingError(message) from interrupt

    monkeypatch.setattr("qlora.recipe.run_training", stopped)
    assert main(_train_argv(tmp_path)) == 130
    assert capsys.readouterr().err == (
        "qlora train: error: interrupted at step 3; nothing half-written. Continue: --resume\n"
    )


# -- --overwrite reaches the writers ---------------------------------------------------------


class _Model:
    qlora_load_info = type("Info", (), {"quantized_layers": 3, "bits_per_quantized_param": 4.1})


@pytest.mark.parametrize("overwrite", [False, True])
def test_quantize_passes_overwrite(overwrite: bool, monkeypatch, tmp_path) -> None:
    seen: dict = {}

    def load_model(source: str, **kwargs: object) -> tuple:
        seen["load"] = kwargs
        return _Model(), "tok"

    def save_quantized(model: object, out: str, tok: object, **kwargs: object) -> str:
        seen["save"] = kwargs
        return out

    monkeypatch.setattr("qlora.models.load_model", load_model)
    monkeypatch.setattr("qlora.models.save_quantized", save_quantized)
    flag = ["--overwrite"] if overwrite else []
    assert main(["quantize", "src", str(tmp_path / "q"), "--blocksize", "128", *flag]) == 0
    assert seen["save"] == {"overwrite": overwrite}
    assert seen["load"]["blocksize"] == 128 and seen["load"]["quant"] == "nf4"


@pytest.mark.parametrize("overwrite", [False, True])
def test_merge_passes_overwrite(overwrite: bool, monkeypatch, tmp_path) -> None:
    seen: dict = {}

    def tok(text: str, return_tensors: str) -> object:
        return type("Encoded", (), {"input_ids": [[1, 2]]})

    def export_merged(model: object, out: str, tokenizer: object, **kwargs: object) -> str:
        seen.update(kwargs)
        return "merged"

    monkeypatch.setattr("qlora.cli._load", lambda args: (object(), tok))
    monkeypatch.setattr("qlora.adapters.export_merged", export_merged)
    flag = ["--overwrite"] if overwrite else []
    assert main(["merge", str(tmp_path / "m"), "--adapter", "a", *flag]) == 0
    assert seen == {"check_input_ids": [[1, 2]], "overwrite": overwrite}


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        ([], "data.path is not set: give the training data"),
        (["data.path=missing.jsonl"], "data.path='missing.jsonl': no such file"),
        (["data.path=here.jsonl", "data.eval_path=gone.jsonl"], "data.eval_path='gone.jsonl'"),
    ],
)
def test_train_checks_the_data_files_before_loading_a_model(
    sets: list[str], message: str, capsys: pytest.CaptureFixture[str], monkeypatch, tmp_path
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "here.jsonl").write_text("")
    monkeypatch.setattr("qlora.recipe.load_base", _no_model)
    argv = ["train", *(a for s in sets for a in ("--set", s))]
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith(f"qlora train: error: {message}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here.jsonl"]  # no run dir made


@pytest.mark.parametrize(
    ("flags", "expected"),
    [([], (False, False)), (["--resume"], (True, False)), (["--overwrite"], (False, True))],
)
def test_train_passes_resume_and_overwrite(flags: list[str], expected: tuple, monkeypatch) -> None:
    seen: dict = {}

    def run_training(config: object, resume: bool, overwrite: bool) -> NoReturn:
        seen.update(resume=resume, overwrite=overwrite)
        raise KeyboardInterrupt

    monkeypatch.setattr("qlora.recipe.run_training", run_training)
    assert main(["train", *flags]) == 130
    assert (seen["resume"], seen["overwrite"]) == expected


def test_train_into_a_users_folder_is_refused_before_loading(
    capsys: pytest.CaptureFixture[str], monkeypatch, tmp_path
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.yaml").write_text("mine\n")
    (tmp_path / "data.jsonl").write_text('{"text": "hi"}\n')
    monkeypatch.setattr("qlora.recipe.load_base", _no_model)
    for flags in ([], ["--overwrite"]):
        argv = ["train", "--set", "data.path=data.jsonl", "--set", "train.output_dir=.", *flags]
        assert main(argv) == 2
        assert "not a qlora run's (config.yaml, data.jsonl)" in capsys.readouterr().err
    assert (tmp_path / "config.yaml").read_text() == "mine\n"
