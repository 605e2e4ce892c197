"""`load_model(blocks=...)`: each decoder layer handed over as soon as it has loaded, and
`StagedLora`'s adapters (drawn before loading) equal to `add_lora`'s after it.

The model has 12 layers, so the checkpoint's lexicographic key order (layers.0, layers.1,
layers.10, layers.11, layers.2 ...) differs from the module order the adapters are drawn in.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from qlora import LoraConfig, add_lora, load_model
from qlora.nn.lora import LoRALinear
from qlora.nn.qlinear import QuantLinear
from qlora.nn.staged_lora import StagedLora
from tests.tiny_models import tiny_llama

LORA = LoraConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("twelve_layers")
    tiny_llama(seed=0, layers=12, vocab=96).save_pretrained(directory)
    return directory


class _Recorder:
    """A sink that adds the staged adapters to each layer and notes what it saw, when."""

    def __init__(self, quantized: int) -> None:
        self.quantized = quantized  # QuantLinear targets per layer
        self.order: list[str] = []
        self.adapters: StagedLora | None = None
        self.model: nn.Module | None = None

    def start(self, skeleton: nn.Module) -> None:
        torch.manual_seed(5)
        self.adapters, self.model = StagedLora(skeleton, LORA, torch.device("cpu")), skeleton

    def block(self, name: str, layer: nn.Module) -> None:
        assert self.adapters is not None and self.model is not None
        quantized = [m for m in layer.modules() if isinstance(m, QuantLinear)]
        assert len(quantized) == self.quantized, name  # targets installed before the handover
        assert not any(p.is_meta for p in layer.parameters()), name  # complete
        later = [n for n, m in self.model.named_modules() if n.endswith(".layers.5")]
        self.order.append(name)
        if name.endswith(".layers.0"):  # handed over while later layers are still unread
            assert any(p.is_meta for p in self.model.get_submodule(later[0]).parameters())
        self.adapters.attach(layer, name)


@pytest.mark.parametrize("quant", ["nf4", None])
def test_layers_arrive_as_they_load_and_staged_adapters_equal_add_lora(
    checkpoint: Path, quant: str | None
) -> None:
    reference, _ = load_model(checkpoint, quant, tokenizer=False, progress=False)
    torch.manual_seed(5)
    add_lora(reference, LORA)

    sink = _Recorder(7 if quant else 0)
    model, _ = load_model(checkpoint, quant, tokenizer=False, progress=False, blocks=sink)
    assert sink.adapters is not None
    sink.adapters.finish(model)
    # every layer once, in the file's (lexicographic) order
    assert sink.order == sorted(f"model.layers.{i}" for i in range(12))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    expected = {n: p for n, p in reference.named_parameters() if p.requires_grad}
    assert trainable.keys() == expected.keys() and len(trainable) == 12 * 7 * 2
    for name, param in expected.items():
        assert torch.equal(trainable[name], param), name
    assert model.lora_configs == reference.lora_configs
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 12 * 7
    with torch.no_grad():
        tokens = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
        assert torch.equal(model(tokens).logits, reference(tokens).logits)
