"""Recipe YAML + --set overrides -> RunConfig, and the errors for bad keys and values."""

from __future__ import annotations

from pathlib import Path

import pytest

from qlora.config import ConfigError, RunConfig, load_run_config


def test_defaults_follow_the_qlora_recipe() -> None:
    config = load_run_config()
    assert isinstance(config, RunConfig)
    assert (config.quant.kind, config.quant.double_quant) == ("nf4", True)
    assert config.lora.target_modules == "all-linear"
    assert (config.train.schedule, config.train.max_grad_norm) == ("constant", 0.3)
    assert config.model.source == "smollm2-135m"


def test_yaml_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(
        "# qlora train r.yaml\n"
        "lora: {r: 8, alpha: 16, target_modules: [q_proj, v_proj]}\n"
        "train: {lr: 1e-4, max_steps: 50}\n"
        "data: {path: d.jsonl, format: alpaca}\n"
    )
    config = load_run_config(path, ["train.lr=3e-4", "train.grad_ckpt=true", "quant.kind=fp4"])
    assert config.lora.r == 8 and config.lora.alpha == 16.0
    assert isinstance(config.lora.alpha, float)
    assert config.lora.target_modules == ["q_proj", "v_proj"]
    assert config.train.lr == 3e-4 and config.train.max_steps == 50 and config.train.grad_ckpt
    assert config.quant.kind == "fp4" and config.data.format == "alpaca"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.schedul=cosine"], r"unknown config key 'train\.schedul'; valid keys: output_dir"),
        (["trian.lr=1"], r"unknown config section 'trian'; valid sections: model, quant"),
        (["train.schedule=step"], r"train\.schedule='step' is not valid; choose one of 'constant'"),
        (["quant.kind=nf3"], r"quant\.kind='nf3' is not valid"),
        (["train.lr=fast"], r"train\.lr must be a number"),
        (["train.batch_size=0"], r"train\.batch_size must be a positive integer, got 0"),
        (["lr=1"], r"expected section\.key=value"),
    ],
)
def test_bad_keys_and_values_name_the_culprit(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_run_config(None, overrides)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_run_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_run_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected sections model, quant"):
        load_run_config(bad)
