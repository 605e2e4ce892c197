"""QuantLinear: forward/backward against plain autograd, memory, bitsandbytes state dicts."""

import dataclasses

import pytest
import torch
from torch import nn

from qlora.nn.qlinear import QuantLinear
from qlora.quant import KINDS, dequantize_reference

from ..conftest import requires_bnb


def reference_linear(layer: QuantLinear) -> nn.Linear:
    """An nn.Linear holding exactly the weight QuantLinear computes with."""
    ref = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    with torch.no_grad():
        ref.weight.copy_(dequantize_reference(layer.quant_state, layer.compute_dtype))
        if layer.bias is not None:
            ref.bias.copy_(layer.bias)
    return ref.requires_grad_(False)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_input_grad_match_plain_linear(kind: str, bias: bool) -> None:
    layer = QuantLinear.from_linear(nn.Linear(48, 40, bias=bias), kind, blocksize=32)
    ref = reference_linear(layer)
    x = torch.randn(3, 5, 48, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = layer(x), ref(x_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)
    assert not any(p.requires_grad for p in layer.parameters())


def test_gradcheck_in_double_precision_semantics() -> None:
    layer = QuantLinear.from_linear(nn.Linear(16, 8), "nf4", blocksize=32)
    x = torch.randn(4, 16, requires_grad=True)
    # d(sum(y * g))/dx == g @ W for the dequantized W
    g = torch.randn(4, 8)
    (layer(x) * g).sum().backward()
    torch.testing.assert_close(x.grad, g @ layer.dequantized_weight(), rtol=1e-6, atol=1e-6)


def test_backward_saves_only_packed_tensors() -> None:
    layer = QuantLinear.from_linear(nn.Linear(256, 128), "nf4", blocksize=64)
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    x = torch.randn(2, 256, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    float_weights = [t for t in saved if t.is_floating_point() and t.numel() >= 128 * 256]
    assert float_weights == [], "a full-precision weight was saved for backward"
    assert any(t.dtype == torch.uint8 and t.numel() == 128 * 256 // 2 for t in saved)
    y.sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compute_dtype(dtype: torch.dtype) -> None:
    layer = QuantLinear.from_linear(nn.Linear(32, 16), "nf4", compute_dtype=dtype)
    x = torch.randn(2, 32)
    y = layer(x)
    assert y.dtype == torch.float32  # cast back to the input dtype
    assert layer.dequantized_weight().dtype == dtype
    expected = (x.to(dtype) @ layer.dequantized_weight().t()).float() + layer.bias
    torch.testing.assert_close(y, expected, rtol=2e-2, atol=2e-2)


def test_state_dict_keys_and_round_trip() -> None:
    layer = QuantLinear.from_linear(nn.Linear(70, 30), "nf4")
    sd = layer.state_dict()
    assert set(sd) == {
        "weight",
        "bias",
        "weight.absmax",
        "weight.quant_map",
        "weight.nested_absmax",
        "weight.nested_quant_map",
        "weight.quant_state.bitsandbytes__nf4",
    }
    assert sd["weight"].shape == (70 * 30 // 2, 1) and sd["weight"].dtype == torch.uint8
    fresh = QuantLinear.from_linear(nn.Linear(70, 30), "nf4")
    fresh.load_state_dict(sd)
    x = torch.randn(4, 70)
    torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)


def test_load_state_dict_errors() -> None:
    layer = QuantLinear.from_linear(nn.Linear(70, 30), "nf4")
    other = QuantLinear.from_linear(nn.Linear(64, 30), "nf4")
    with pytest.raises(RuntimeError, match=r"checkpoint shape \(30, 64\) does not match"):
        layer.load_state_dict(other.state_dict())
    sd = layer.state_dict()
    del sd["weight.quant_state.bitsandbytes__nf4"]
    with pytest.raises(RuntimeError, match="quant_state"):
        layer.load_state_dict(sd)
    with pytest.raises(RuntimeError, match="Missing key"):
        layer.load_state_dict({"bias": torch.zeros(30)})


def test_to_moves_buffers_and_repr() -> None:
    layer = QuantLinear.from_linear(nn.Linear(8, 4), "fp4").to(torch.device("cpu"))
    assert layer.weight.device.type == "cpu"
    assert "kind=fp4" in repr(layer) and "double_quant" in repr(layer)
    flat = dataclasses.replace(layer.quant_state, shape=torch.Size([32]))
    with pytest.raises(ValueError, match="2-D"):
        QuantLinear(flat)


@requires_bnb
@pytest.mark.compat
@pytest.mark.parametrize("kind", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_state_dict_round_trip_with_bitsandbytes_linear4bit(kind: str, double_quant: bool) -> None:
    import bitsandbytes as bnb
    from bitsandbytes.nn import Params4bit

    base = nn.Linear(70, 30)
    theirs = bnb.nn.Linear4bit(70, 30, bias=True, quant_type=kind, compress_statistics=double_quant)
    theirs.load_state_dict(base.state_dict())
    theirs = theirs.to("cpu")  # quantizes
    ours = QuantLinear.from_linear(base, kind, blocksize=64, double_quant=double_quant)

    # same keys and identical bytes in both directions
    their_sd, our_sd = theirs.state_dict(), ours.state_dict()
    assert set(their_sd) == set(our_sd)
    for key in their_sd:
        assert torch.equal(their_sd[key], our_sd[key]), key

    # bitsandbytes -> ours
    loaded = QuantLinear.from_linear(nn.Linear(70, 30), kind)
    loaded.load_state_dict(their_sd)
    x = torch.randn(5, 70)
    torch.testing.assert_close(loaded(x), ours(x), rtol=0, atol=0)

    # ours -> bitsandbytes (the way transformers loads pre-quantized checkpoints)
    stats = {k.removeprefix("weight."): v for k, v in our_sd.items() if k.startswith("weight.")}
    rebuilt = bnb.nn.Linear4bit(70, 30, bias=True, quant_type=kind)
    rebuilt.weight = Params4bit.from_prequantized(
        data=our_sd["weight"], quantized_stats=stats, device="cpu", module=rebuilt
    )
    rebuilt.bias = nn.Parameter(our_sd["bias"])
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), ours(x), rtol=1e-5, atol=1e-5)
