"""LoRALinear: init, scaling, dropout, named adapters, merging, and QLoRA-vs-LoRA parity."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from qlora.nn import (
    LoRALinear,
    QuantLinear,
    delta_weight,
    merge_adapter,
    merged_weight,
    unmerge_adapter,
)

IN, OUT, R = 64, 48, 4


def _linear(bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(IN, OUT, bias=bias)


def _quant(bias: bool = True, seed: int = 0) -> QuantLinear:
    return QuantLinear.from_linear(_linear(bias, seed), kind="nf4", blocksize=64)


def _randomize_b(layer: LoRALinear, name: str = "default", seed: int = 1) -> None:
    """B starts at zero; give it values so the adapter actually changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        weight = layer.lora_B[name].weight
        weight.copy_(torch.randn(weight.shape, generator=gen) * 0.1)


def _x(*shape: int, seed: int = 2) -> torch.Tensor:
    return torch.randn(*shape, IN, generator=torch.Generator().manual_seed(seed))


def _manual(layer: LoRALinear, x: torch.Tensor, names: list[str]) -> torch.Tensor:
    """The LoRA formula written out: base(x) + Σ scaling · x Aᵀ Bᵀ (no dropout)."""
    out = layer.base_layer(x)
    for name in names:
        a = layer.lora_A[name].weight  # [r, in]
        b = layer.lora_B[name].weight  # [out, r]
        out = out + (x @ a.t() @ b.t()) * layer.scaling[name]
    return out


# -- construction ------------------------------------------------------------------------------


@pytest.mark.parametrize("make_base", [_linear, _quant], ids=["linear", "quant"])
@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
def test_fresh_adapter_leaves_output_unchanged(make_base, init: str) -> None:
    base = make_base()
    layer = LoRALinear(base, "default", r=R, alpha=8, init=init)
    x = _x(3, 5)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
    assert torch.count_nonzero(layer.lora_A["default"].weight) > 0


def test_shapes_names_and_state_dict_keys() -> None:
    layer = LoRALinear(_linear(), "default", r=R, alpha=8, dropout=0.1)
    assert layer.lora_A["default"].weight.shape == (R, IN)
    assert layer.lora_B["default"].weight.shape == (OUT, R)
    assert layer.lora_A["default"].bias is None and layer.lora_B["default"].bias is None
    assert isinstance(layer.lora_dropout["default"], nn.Dropout)
    assert layer(_x(2, 7, 3)).shape == (2, 7, 3, OUT)
    assert set(layer.state_dict()) == {
        "base_layer.weight",
        "base_layer.bias",
        "lora_A.default.weight",
        "lora_B.default.weight",
    }
    assert (layer.in_features, layer.out_features) == (IN, OUT)
    assert layer.weight is layer.base_layer.weight


def test_state_dict_over_quant_base_keeps_bitsandbytes_keys() -> None:
    layer = LoRALinear(_quant(), "default", r=R, alpha=8)
    keys = set(layer.state_dict())
    assert {"base_layer.weight", "base_layer.weight.absmax", "lora_A.default.weight"} <= keys


def test_init_distributions() -> None:
    torch.manual_seed(0)
    kaiming = LoRALinear(nn.Linear(256, 256), "default", r=64, alpha=64)
    a = kaiming.lora_A["default"].weight
    # kaiming_uniform_(a=√5) on fan_in=256 is U(-1/√256, 1/√256), as nn.Linear's own init.
    assert a.abs().max() <= 1 / 16
    assert a.std().item() == pytest.approx(1 / 16 / math.sqrt(3), rel=0.05)
    gauss = LoRALinear(nn.Linear(256, 256), "default", r=64, alpha=64, init="gaussian")
    assert gauss.lora_A["default"].weight.std().item() == pytest.approx(1 / 64, rel=0.05)


def test_scaling_with_and_without_rslora() -> None:
    layer = LoRALinear(_linear())
    layer.add_adapter("plain", r=16, alpha=32)
    layer.add_adapter("rs", r=16, alpha=32, use_rslora=True)
    assert layer.scaling == {"plain": 2.0, "rs": 8.0}
    layer.set_adapter("rs")
    _randomize_b(layer, "rs")
    x = _x(4)
    expected = layer.base_layer(x) + 8.0 * (
        x @ layer.lora_A["rs"].weight.t() @ layer.lora_B["rs"].weight.t()
    )
    torch.testing.assert_close(layer(x), expected)


def test_forward_matches_formula_and_zero_dropout_is_identity() -> None:
    layer = LoRALinear(_linear(), "default", r=R, alpha=16, dropout=0.0)
    assert isinstance(layer.lora_dropout["default"], nn.Identity)
    _randomize_b(layer)
    x = _x(5)
    torch.testing.assert_close(layer(x), _manual(layer, x, ["default"]))


def test_dropout_only_in_train_mode() -> None:
    layer = LoRALinear(_linear(), "default", r=R, alpha=16, dropout=0.5)
    _randomize_b(layer)
    x = _x(8)
    layer.eval()
    torch.testing.assert_close(layer(x), _manual(layer, x, ["default"]))
    torch.testing.assert_close(layer(x), layer(x), rtol=0, atol=0)
    layer.train()
    torch.manual_seed(0)
    first = layer(x)
    second = layer(x)
    assert not torch.allclose(first, second)
    assert not torch.allclose(first, _manual(layer, x, ["default"]))
    # Dropout acts on the adapter branch only: with B = 0 train mode is exact again.
    with torch.no_grad():
        layer.lora_B["default"].weight.zero_()
    torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=0, atol=0)


def test_adapter_dtype_is_float32_independent_of_base() -> None:
    base = _linear().to(torch.bfloat16)
    layer = LoRALinear(base, "default", r=R, alpha=8)
    assert layer.lora_A["default"].weight.dtype == torch.float32
    assert layer.lora_B["default"].weight.dtype == torch.float32
    _randomize_b(layer)
    x = _x(3).to(torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    expected = base(x).float() + layer.scaling["default"] * (
        x.float() @ layer.lora_A["default"].weight.t() @ layer.lora_B["default"].weight.t()
    )
    torch.testing.assert_close(out, expected.to(torch.bfloat16))


def test_bad_arguments() -> None:
    layer = LoRALinear(_linear(), "default", r=R, alpha=8)
    with pytest.raises(ValueError, match="already exists"):
        layer.add_adapter("default", r=R, alpha=8)
    with pytest.raises(ValueError, match=r"without '\.'"):
        layer.add_adapter("a.b", r=R, alpha=8)
    with pytest.raises(ValueError, match="rank"):
        layer.add_adapter("zero", r=0, alpha=8)
    with pytest.raises(ValueError, match="unknown adapter"):
        layer.set_adapter("nope")
    with pytest.raises(TypeError):
        LoRALinear(layer)
    with pytest.raises(TypeError):
        LoRALinear(nn.ReLU())


# -- several adapters ----------------------------------------------------------------------------


def _two_adapters() -> LoRALinear:
    layer = LoRALinear(_linear())
    layer.add_adapter("a", r=R, alpha=8)
    layer.add_adapter("b", r=2, alpha=4, use_rslora=True)
    _randomize_b(layer, "a", seed=10)
    _randomize_b(layer, "b", seed=11)
    return layer


def test_new_adapter_is_inactive_and_frozen_until_set() -> None:
    layer = _two_adapters()
    assert layer.active_adapters == []
    assert not any(
        p.requires_grad for p in [*layer.lora_A.parameters(), *layer.lora_B.parameters()]
    )
    x = _x(4)
    torch.testing.assert_close(layer(x), layer.base_layer(x))


def test_set_adapter_switches_output_and_requires_grad() -> None:
    layer = _two_adapters()
    x = _x(4)
    layer.set_adapter("b")
    assert layer.lora_A["b"].weight.requires_grad and layer.lora_B["b"].weight.requires_grad
    assert not layer.lora_A["a"].weight.requires_grad and not layer.lora_B["a"].weight.requires_grad
    torch.testing.assert_close(layer(x), _manual(layer, x, ["b"]))
    layer.set_adapter(["a", "b"])
    assert all(p.requires_grad for p in layer.lora_A.parameters())
    torch.testing.assert_close(layer(x), _manual(layer, x, ["a", "b"]))
    layer.set_adapter("a")
    torch.testing.assert_close(layer(x), _manual(layer, x, ["a"]))


def test_disabled_flag_gives_base_output() -> None:
    layer = _two_adapters()
    layer.set_adapter(["a", "b"])
    x = _x(4)
    layer.disabled = True
    torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=0, atol=0)
    layer.disabled = False
    torch.testing.assert_close(layer(x), _manual(layer, x, ["a", "b"]))


def test_delete_adapter() -> None:
    layer = _two_adapters()
    layer.set_adapter(["a", "b"])
    layer.delete_adapter("a")
    assert layer.adapter_names == ["b"] and layer.active_adapters == ["b"]
    assert "a" not in layer.scaling and "a" not in layer.lora_dropout
    assert not any(k.startswith("lora_A.a.") for k in layer.state_dict())
    x = _x(4)
    torch.testing.assert_close(layer(x), _manual(layer, x, ["b"]))
    with pytest.raises(ValueError, match="unknown adapter"):
        layer.delete_adapter("a")


# -- merging on an nn.Linear base ----------------------------------------------------------------


def test_delta_and_merged_weight_are_pure() -> None:
    layer = _two_adapters()
    layer.set_adapter(["a", "b"])
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    delta_a = delta_weight(layer, "a")
    expected_a = layer.scaling["a"] * layer.lora_B["a"].weight @ layer.lora_A["a"].weight
    torch.testing.assert_close(delta_a, expected_a)
    assert delta_a.shape == (OUT, IN)
    weight = merged_weight(layer)
    torch.testing.assert_close(weight, layer.base_layer.weight + delta_a + delta_weight(layer, "b"))
    torch.testing.assert_close(
        merged_weight(layer, ["b"]), layer.base_layer.weight + delta_weight(layer, "b")
    )
    for key, value in layer.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    assert layer.merged_adapters == []


def test_merge_unmerge_round_trip_on_linear_base() -> None:
    layer = _two_adapters()
    layer.set_adapter(["a", "b"])
    layer.eval()
    x = _x(6)
    expected = layer(x)
    original = layer.base_layer.weight.detach().clone()
    base_object = layer.base_layer
    merge_adapter(layer)
    assert layer.merged_adapters == ["a", "b"] and layer.base_layer is base_object
    assert not torch.allclose(layer.base_layer.weight, original)
    torch.testing.assert_close(layer(x), expected)
    # The pure merged weight still means "base + active deltas" while merged in place.
    torch.testing.assert_close(merged_weight(layer), layer.base_layer.weight)
    torch.testing.assert_close(merged_weight(layer, []), original)
    unmerge_adapter(layer)
    assert layer.merged_adapters == []
    torch.testing.assert_close(layer.base_layer.weight, original, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), expected)


def test_disabled_forward_unmerges_first() -> None:
    layer = _two_adapters()
    layer.set_adapter("a")
    original = layer.base_layer.weight.detach().clone()
    merge_adapter(layer)
    layer.disabled = True
    x = _x(4)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, original, layer.base_layer.bias))
    assert layer.merged_adapters == []


def test_set_adapter_while_merged_unmerges_with_warning() -> None:
    layer = _two_adapters()
    layer.set_adapter("a")
    merge_adapter(layer)
    with pytest.warns(UserWarning, match="unmerging"):
        layer.set_adapter("b")
    assert layer.merged_adapters == []
    x = _x(4)
    torch.testing.assert_close(layer(x), _manual(layer, x, ["b"]))


# -- merging on a QuantLinear base ---------------------------------------------------------------


def _quant_buffers(q: QuantLinear) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in q.state_dict().items()}


def test_merge_on_quant_base_dequantizes_and_unmerge_restores_exact_object() -> None:
    quant = _quant()
    layer = LoRALinear(quant, "default", r=R, alpha=8)
    _randomize_b(layer)
    layer.eval()
    x = _x(6)
    expected = layer(x)
    before = _quant_buffers(quant)
    pure = merged_weight(layer)
    torch.testing.assert_close(pure, quant.dequantized_weight() + delta_weight(layer, "default"))

    merge_adapter(layer)
    merged_base = layer.base_layer
    assert type(merged_base) is nn.Linear
    assert merged_base.weight.dtype == torch.float32
    torch.testing.assert_close(
        merged_base.weight, quant.dequantized_weight(torch.float32) + delta_weight(layer, "default")
    )
    torch.testing.assert_close(merged_base.bias, quant.bias)
    assert not merged_base.weight.requires_grad
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(merged_weight(layer), pure)
    # The set-aside QuantLinear is not part of the module tree while merged.
    assert all(m is not quant for m in layer.modules())
    assert "base_layer.weight.absmax" not in layer.state_dict()

    unmerge_adapter(layer)
    assert layer.base_layer is quant
    for key, value in quant.state_dict().items():
        assert torch.equal(value, before[key]), key
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)


def test_merge_on_quant_base_twice_then_unmerge() -> None:
    quant = _quant()
    layer = LoRALinear(quant)
    layer.add_adapter("a", r=R, alpha=8)
    layer.add_adapter("b", r=R, alpha=8)
    _randomize_b(layer, "a", seed=3)
    _randomize_b(layer, "b", seed=4)
    layer.set_adapter(["a", "b"])
    x = _x(3)
    expected = layer(x)
    merge_adapter(layer, "a")
    merge_adapter(layer, "b")
    assert layer.merged_adapters == ["a", "b"]
    torch.testing.assert_close(layer(x), expected)
    unmerge_adapter(layer)
    assert layer.base_layer is quant
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)


# -- QLoRA vs LoRA parity --------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_qlora_matches_lora_on_dequantized_weight(bias: bool) -> None:
    """Over the same effective weight, the quantized path must be invisible to the adapter:
    same outputs, same adapter gradients, same input gradient."""
    quant = _quant(bias=bias)
    dense = nn.Linear(IN, OUT, bias=bias)
    with torch.no_grad():
        dense.weight.copy_(quant.dequantized_weight())
        if bias:
            dense.bias.copy_(quant.bias)
    dense.requires_grad_(False)
    qlora = LoRALinear(quant, "default", r=R, alpha=16, dropout=0.0)
    lora = LoRALinear(dense, "default", r=R, alpha=16, dropout=0.0)
    _randomize_b(qlora)
    lora.load_state_dict(
        {k: v for k, v in qlora.state_dict().items() if k.startswith("lora_")}, strict=False
    )

    x = _x(2, 5)
    xq = x.clone().requires_grad_(True)
    xl = x.clone().requires_grad_(True)
    target = torch.randn(2, 5, OUT, generator=torch.Generator().manual_seed(7))
    out_q, out_l = qlora(xq), lora(xl)
    torch.testing.assert_close(out_q, out_l)
    ((out_q - target) ** 2).mean().backward()
    ((out_l - target) ** 2).mean().backward()
    for name in ("lora_A", "lora_B"):
        grad_q = getattr(qlora, name)["default"].weight.grad
        grad_l = getattr(lora, name)["default"].weight.grad
        assert grad_q is not None and torch.count_nonzero(grad_q) > 0
        torch.testing.assert_close(grad_q, grad_l)
    torch.testing.assert_close(xq.grad, xl.grad)


def test_adapters_added_to_an_eval_model_stay_in_eval_mode() -> None:
    from qlora.config import LoraConfig
    from qlora.nn import add_lora
    from tests.tiny_models import tiny_llama

    model = tiny_llama().eval()
    add_lora(model, LoraConfig(r=4, dropout=0.5))
    assert not any(m.training for m in model.modules())
    ids = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids).logits)  # dropout is off
    model.train()
    assert all(m.training for m in model.modules())
