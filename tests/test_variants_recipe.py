"""`qlora train` with the LoRA variants on the default model: two real steps each, the adapter
files they leave, and those files loaded back (skipped where the model cannot be found)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qlora.adapters import load_adapter
from qlora.config import load_run_config
from qlora.nn import LoRALinear, lora_layers
from tests.default_model import default_model_or_skip, task_train_file


def _run(tmp_path: Path, *settings: str):  # type: ignore[no-untyped-def]
    from qlora.recipe import run_training

    default_model_or_skip()
    train = task_train_file(tmp_path, 4)
    overrides = [f"data.path={train}", f"train.output_dir={tmp_path / 'run'}"]
    overrides += ["train.max_steps=2", "train.batch_size=2", *settings]
    return run_training(load_run_config(None, overrides), progress=False)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.tensor([[1, 42, 7, 300, 9]])
    with torch.no_grad():
        return model(ids).logits


def test_qdora_run_writes_a_dora_adapter_that_loads_back(tmp_path: Path) -> None:
    result = _run(tmp_path, "lora.use_dora=true", "lora.dropout=0.0")
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    from qlora.recipe import load_base

    base, _ = load_base(load_run_config(None, ["data.path=x.jsonl"]), progress=False)
    load_adapter(base, result.adapter_dir)
    result.model.eval()
    assert torch.allclose(_logits(base), _logits(result.model), atol=1e-4)


def test_qpissa_run_writes_the_converted_and_the_pissa_adapter(tmp_path: Path) -> None:
    from qlora.recipe import load_base

    result = _run(tmp_path, "lora.init=pissa", "lora.dropout=0.0")
    pissa_dir = tmp_path / "run" / "adapter-pissa"
    converted = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    as_trained = json.loads((pissa_dir / "adapter_config.json").read_text())
    assert (converted["r"], converted["init_lora_weights"]) == (32, True)
    assert (as_trained["r"], as_trained["init_lora_weights"]) == (16, "pissa")
    full = load_run_config(  # float32: the comparison is of the adapters, not of bf16 rounding
        None, ["data.path=x.jsonl", "quant.kind=null", "quant.compute_dtype=float32"]
    )
    # the trained adapter over the full-precision residual (the loader redoes the split) ...
    residual, _ = load_base(full, progress=False)
    load_adapter(residual, pissa_dir)
    # ... is the converted rank-32 LoRA over the original full-precision weights
    original, _ = load_base(full, progress=False)
    load_adapter(original, result.adapter_dir)
    assert all(isinstance(layer, LoRALinear) for _, layer in lora_layers(original))
    assert torch.allclose(_logits(original), _logits(residual), atol=1e-3)
