"""Every config value is checked when the config is parsed, before any model loads.

Each case was accepted silently or failed only later (after the model loaded, or as a
traceback) before; each error names the key and says what is valid.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
import torch

from qlora.config import (
    ConfigError,
    DataConfig,
    GenerationConfig,
    LoraConfig,
    ModelConfig,
    QuantConfig,
    TrainConfig,
    field_choices,
    field_doc,
    load_run_config,
)
from qlora.dtypes import DTYPE_NAMES, dtype_bytes, dtype_name, torch_dtype
from qlora.optim.build import OPTIMIZERS
from qlora.quant.codebooks import KINDS

BAD_VALUES = [
    (["train.epochs=-1"], r"train\.epochs must be > 0 \(or set train\.max_steps\), got -1\.0"),
    (["train.epochs=0"], r"train\.epochs must be > 0"),
    (["train.epochs=-1", "train.max_steps=5"], r"train\.epochs must be >= 0, got -1\.0"),
    (["train.lr=-1"], r"train\.lr must be > 0, got -1\.0"),
    (["train.lr=0"], r"train\.lr must be > 0, got 0\.0"),
    (["train.lr=.nan"], r"train\.lr must be a finite number, got nan"),
    (["train.weight_decay=-0.1"], r"train\.weight_decay must be >= 0, got -0\.1"),
    (["train.max_grad_norm=-1"], r"train\.max_grad_norm must be >= 0"),
    (["train.log_every=0"], r"train\.log_every must be a positive integer, got 0"),
    (["train.seed=-1"], r"train\.seed must be >= 0"),
    (["train.output_dir="], r"train\.output_dir must be a directory name, got ''"),
    (["train.optim=sgd"], r"train\.optim='sgd' is not valid; choose one of 'adamw'"),
    (["quant.kind=nf3"], r"quant\.kind='nf3' is not valid; choose one of 'nf4', .* or null"),
    (["quant.blocksize=48"], r"quant\.blocksize must be one of 32, 64, .*, got 48"),
    (["quant.compute_dtype=float8"], r"quant\.compute_dtype='float8'.*'bfloat16'"),
    (["quant.target_modules=("], r"quant\.target_modules='\(' is not a valid regular exp"),
    (["lora.target_modules=("], r"lora\.target_modules='\(' is not a valid regular exp"),
    (["lora.target_modules=[]"], r"lora\.target_modules must be a non-empty list"),
    (["lora.target_modules=5"], r"lora\.target_modules must be a string or a list of str"),
    (["lora.target_modules=[q_proj, 3]"], r"lora\.target_modules\[1\] must be a string"),
    (["lora.exclude_modules=['']"], r"lora\.exclude_modules must be non-empty names"),
    (["lora.alpha=0"], r"lora\.alpha must be > 0"),
    (["lora.alpha=-16"], r"lora\.alpha must be > 0"),
    (["lora.r=0"], r"lora\.r must be a positive integer, got 0"),
    (["lora.init=loftq", "quant.kind=null"], r"lora\.init='loftq' .* quant\.kind is null"),
    (["data.max_seq_len=0"], r"data\.max_seq_len must be a positive integer"),
    (["data.eval_fraction=1"], r"data\.eval_fraction must be in \[0, 1\)"),
    (["data.eval_path="], r"data\.eval_path must be a file path or null"),
    (["data.seed=-3"], r"data\.seed must be >= 0"),
    (["model.dtype=float64"], r"model\.dtype='float64' is not valid; choose one of 'auto', "),
    (["model.device=gpu"], r"model\.device='gpu' is not a device name; use auto, cpu, cuda"),
    (["model.device=cuda:x"], r"model\.device='cuda:x' is not a device name"),
    (["model.source="], r"model\.source must be a model name, directory or file"),
    (["train.lr=[1"], r"--set 'train\.lr=\[1': not a valid YAML value: line 1, column 3"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_VALUES, ids=lambda v: str(v)[:40])
def test_bad_values_fail_at_parse_time_naming_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        load_run_config(None, overrides)
    assert "\n" not in str(caught.value)  # the CLI prints one line


def test_cuda_device_without_cuda_is_a_parse_time_error() -> None:
    if torch.cuda.is_available():
        device, message = f"cuda:{torch.cuda.device_count()}", r"only \d+ CUDA device\(s\)"
    else:
        device, message = "cuda", r"CUDA is not available here.*use cpu or auto"
    with pytest.raises(ConfigError, match=rf"model\.device='{device}' but {message}"):
        load_run_config(None, [f"model.device={device}"])
    with pytest.raises(ConfigError, match=r"model\.device='cuda:7'"):
        ModelConfig(device="cuda:7")  # the same check when built from Python


def test_valid_edges_are_accepted() -> None:
    config = load_run_config(None, ["train.epochs=0", "train.max_steps=5", "train.lr=1e-4",
                                    "train.max_grad_norm=0", "lora.target_modules=.*proj",
                                    "quant.kind=null", "model.device=cpu",
                                    "model.trust_remote_code=true"])  # fmt: skip
    assert config.train.epochs == 0.0 and config.quant.kind is None
    assert config.model.trust_remote_code is True  # on purpose only: the default is False
    assert ModelConfig().trust_remote_code is False
    assert GenerationConfig(temperature=0, top_p=1).top_p == 1.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -1.0}, r"generation\.temperature must be >= 0 \(0: greedy\), got -1\.0"),
        ({"top_p": 5.0}, r"generation\.top_p must be in \(0, 1\], got 5\.0"),
        ({"top_p": 0.0}, r"generation\.top_p must be in \(0, 1\]"),
        ({"max_new_tokens": 0}, r"generation\.max_new_tokens must be a positive integer"),
    ],
)
def test_generation_settings_are_checked(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        GenerationConfig(**kwargs)


def test_configs_built_in_python_are_checked_too(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"quant\.kind='nf3' is not valid; choose one of"):
        QuantConfig(kind="nf3")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"train\.lr must be > 0"):
        TrainConfig(lr=-1.0)
    with pytest.raises(ConfigError, match=r"train\.lr must be > 0"):
        dataclasses.replace(TrainConfig(), lr=0.0)
    config = TrainConfig(output_dir=tmp_path, epochs=2)  # type: ignore[arg-type]
    assert config.output_dir == str(tmp_path) and config.epochs == 2.0
    assert isinstance(LoraConfig(alpha=16).alpha, float)
    assert DataConfig(path=tmp_path / "d.jsonl").path.endswith("d.jsonl")  # type: ignore[arg-type]


def test_malformed_yaml_names_the_file_line_and_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("# a recipe\ntrain:\n  lr: 1e-4\n  epochs: [1, 2\nlora: {r: 8}\n")
    with pytest.raises(ConfigError) as caught:
        load_run_config(bad)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{bad}: not valid YAML: line 5, column 5: expected ',' or ']'")
    assert "while parsing a flow sequence at line 4" in message
    bad.write_text("train:\n\tlr: 1\n")  # a tab: YAML forbids tabs for indentation
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML: line 2, column 1: "):
        load_run_config(bad)


def test_duplicate_keys_are_errors_not_silently_dropped(tmp_path: Path) -> None:
    recipe = tmp_path / "dup.yaml"
    recipe.write_text("train: {lr: 1e-4}\nlora: {r: 8}\ntrain: {max_steps: 5}\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml: not valid YAML: line 3, column 1: "
                                          r"duplicate key 'train'"):  # fmt: skip
        load_run_config(recipe)


def test_choices_come_from_the_modules_that_own_them() -> None:
    assert field_choices(QuantConfig, "kind") == (*KINDS, "gguf", None)
    assert field_choices(TrainConfig, "optim") == OPTIMIZERS
    assert field_choices(QuantConfig, "compute_dtype") == ("auto", *DTYPE_NAMES)
    assert field_choices(ModelConfig, "dtype") == ("auto", *DTYPE_NAMES)
    assert field_choices(TrainConfig, "lr") == ()
    assert typing.get_args(typing.get_type_hints(TrainConfig)["optim"]) == OPTIMIZERS


def test_field_doc_reads_the_attributes_section() -> None:
    assert field_doc(QuantConfig, "kind").startswith("codebook for the frozen Linear weights")
    doc = field_doc(TrainConfig, "malloc_mmap_kb")  # a multi-line entry, joined
    assert doc.startswith("on the CPU, make glibc map") and doc.endswith("qlora.train.allocator.")
    assert field_doc(TrainConfig, "tensorboard").startswith("also log to TensorBoard")
    assert field_doc(TrainConfig, "nonexistent") == ""


def test_one_map_between_dtype_names_and_torch() -> None:
    for name in DTYPE_NAMES:
        assert dtype_name(torch_dtype(name)) == name
        assert dtype_bytes(name) == torch_dtype(name).itemsize
    with pytest.raises(ValueError, match=r"unknown dtype 'float64'; choose one of float32, "):
        torch_dtype("float64")
    with pytest.raises(ValueError, match=r"unsupported dtype torch\.int8"):
        dtype_name(torch.int8)
