"""DoRA against the real PEFT: logits and adapter gradients of the same weights, adapter files
both ways, QDoRA (a 4-bit base) against PEFT's DoRA on the same base dequantized."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

from qlora.adapters import load_adapter, read_adapter, save_adapter
from qlora.adapters._peft_files import AdapterFormatError
from qlora.config import LoraConfig, QuantConfig
from qlora.nn import LoRALinear, QuantLinear, add_lora, lora_layers, quantize_model
from tests.adapters.helpers import input_ids, logits, max_diff
from tests.tiny_models import tiny_llama

TOL = 1e-4
pytestmark = pytest.mark.compat


@pytest.fixture
def peft() -> ModuleType:
    return pytest.importorskip("peft")


def _ours_dora(base: nn.Module | None = None) -> nn.Module:
    """tiny_llama with a DoRA adapter on every linear layer, A, B and m all away from init."""
    model = base if base is not None else tiny_llama(seed=0)
    add_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0, use_dora=True))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for weight in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.2)
            magnitude = layer.lora_magnitude_vector["default"]
            magnitude.mul_(1 + 0.2 * torch.rand(magnitude.shape, generator=generator))
    return model


def _loss(model: nn.Module) -> torch.Tensor:
    ids = input_ids()
    return model(input_ids=ids, labels=ids).loss


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter gradients by (module, kind), names normalized across PEFT and ours."""
    out = {}
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        name = name.removeprefix("base_model.model.").replace(".default", "")
        out[name.removesuffix(".weight") if "magnitude" in name else name] = param.grad
    return out


def test_our_dora_adapter_in_peft_same_logits_and_gradients(
    tmp_path: Path, peft: ModuleType
) -> None:
    ours = _ours_dora()
    save_adapter(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    theirs = peft.PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path, is_trainable=True)
    assert max_diff(logits(theirs), logits(ours)) <= TOL
    assert max_diff(logits(theirs), logits(tiny_llama(seed=0))) > 1e-2  # DoRA matters
    ours.train()
    theirs.train()
    _loss(ours).backward()
    _loss(theirs).backward()
    mine, peers = _grads(ours), _grads(theirs)
    assert mine.keys() == peers.keys() and any("magnitude" in k for k in mine)
    worst = max(max_diff(mine[k], peers[k]) / (float(peers[k].abs().max()) + 1e-12) for k in mine)
    assert worst <= TOL, worst


def test_a_peft_dora_adapter_loads_in_ours_with_same_logits(
    tmp_path: Path, peft: ModuleType
) -> None:
    config = peft.LoraConfig(
        task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear",
        use_dora=True, init_lora_weights=False,
    )  # fmt: skip
    torch.manual_seed(5)
    theirs = peft.get_peft_model(tiny_llama(seed=0), config)
    with torch.no_grad():  # magnitudes away from ‖W + sBA‖ too
        for name, param in theirs.named_parameters():
            if "magnitude" in name:
                param.mul_(1 + 0.2 * torch.rand(param.shape))
    theirs.save_pretrained(tmp_path)
    ours = tiny_llama(seed=0)
    load_adapter(ours, tmp_path)
    assert max_diff(logits(theirs), logits(ours)) <= TOL
    # and back out: the file we write again equals theirs key for key
    save_adapter(ours, tmp_path / "again")
    again = peft.PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path / "again")
    assert max_diff(logits(again), logits(theirs)) <= TOL


def test_qdora_equals_peft_dora_on_the_dequantized_base(tmp_path: Path, peft: ModuleType) -> None:
    quantized = quantize_model(tiny_llama(seed=0), QuantConfig(kind="nf4", compute_dtype="float32"))
    ours = _ours_dora(quantized)
    save_adapter(ours, tmp_path)
    dequantized = tiny_llama(seed=0)  # the same base with each weight its nf4 dequantization
    with torch.no_grad():
        for name, layer in lora_layers(ours):
            assert isinstance(layer.base_layer, QuantLinear)
            target = dequantized.get_submodule(name)
            target.weight.copy_(layer.base_layer.dequantized_weight(torch.float32))
    theirs = peft.PeftModel.from_pretrained(dequantized, tmp_path, is_trainable=True)
    assert max_diff(logits(theirs), logits(ours)) <= TOL
    ours.train()
    theirs.train()
    _loss(ours).backward()
    _loss(theirs).backward()
    mine, peers = _grads(ours), _grads(theirs)
    worst = max(max_diff(mine[k], peers[k]) / (float(peers[k].abs().max()) + 1e-12) for k in mine)
    assert worst <= TOL, worst


def test_dora_files_round_trip_in_every_precision(tmp_path: Path) -> None:
    ours = _ours_dora()
    for dtype in ("float32", "bfloat16", "int8"):
        save_adapter(ours, tmp_path / dtype, dtype=dtype)
        back = tiny_llama(seed=0)
        load_adapter(back, tmp_path / dtype)
        layer = back.get_submodule("model.layers.0.self_attn.q_proj")
        assert isinstance(layer, LoRALinear) and "default" in layer.lora_magnitude_vector
        tol = {"float32": 1e-6, "bfloat16": 0.05, "int8": 0.05}[dtype]
        assert max_diff(logits(back), logits(ours)) <= tol, dtype


def test_dora_files_that_do_not_fit_are_refused(tmp_path: Path) -> None:
    save_adapter(_ours_dora(), tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "use_dora": False}))
    with pytest.raises(AdapterFormatError, match=r"DoRA magnitude, but adapter_config.json has"):
        load_adapter(tiny_llama(seed=0), tmp_path)
    config_path.write_text(json.dumps(config))
    with pytest.raises(AdapterFormatError, match=r"a DoRA adapter .* not served unmerged"):
        read_adapter(tiny_llama(seed=0), tmp_path)
