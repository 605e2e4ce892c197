"""read_adapter: an adapter's checked tensors for a model, the model untouched."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qlora import add_lora, load_adapter, save_adapter
from qlora.adapters import AdapterFormatError, read_adapter
from qlora.config import LoraConfig
from qlora.nn.inject import lora_layers
from tests.tiny_models import tiny_llama


def _saved(tmp_path: Path, **lora: object) -> Path:
    model = tiny_llama(seed=0)
    add_lora(model, LoraConfig(r=4, alpha=8.0, dropout=0.0, **lora))  # type: ignore[arg-type]
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    return save_adapter(model, tmp_path / "adapter")


@pytest.mark.parametrize("rslora", [False, True])
def test_tensors_equal_what_load_adapter_installs(tmp_path: Path, rslora: bool) -> None:
    path = _saved(tmp_path, use_rslora=rslora)
    plain = tiny_llama(seed=0)
    weights = read_adapter(plain, path)
    assert not list(lora_layers(plain))  # untouched
    loaded = tiny_llama(seed=0)
    load_adapter(loaded, path)
    layers = dict(lora_layers(loaded))
    assert set(weights) == set(layers)
    for module, (weight_a, weight_b, scaling) in weights.items():
        layer = layers[module]
        assert torch.equal(weight_a, layer.lora_A["default"].weight)
        assert torch.equal(weight_b, layer.lora_B["default"].weight)
        assert scaling == layer.scaling["default"]
        assert weight_a.dtype == torch.float32


def test_an_adapter_for_another_model_is_refused(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    with pytest.raises(AdapterFormatError, match="another base model"):
        read_adapter(tiny_llama(seed=0, hidden=32), path)
