"""Every recipe in configs/ parses, and its first line is the command that runs it."""

from __future__ import annotations

from pathlib import Path

import pytest

from qlora.config import load_run_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_recipes() -> None:
    assert CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_recipe_parses_and_names_its_command(path: Path) -> None:
    assert path.read_text().splitlines()[0].startswith(f"# qlora train configs/{path.name}")
    config = load_run_config(path)
    if "gguf" in path.name:  # the GGUF's own blocks: no codebook
        assert config.quant.kind == "gguf"
    else:  # the QLoRA paper's recipe
        assert config.quant.kind == "nf4" and config.quant.double_quant
