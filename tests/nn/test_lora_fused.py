"""The fused LoRA path and counter-based dropout against their references.

Oracles: `LoRALinear.reference_forward` (modules composed, autograd's gradients) and
`keep_mask_reference` (the dropout hash in PyTorch int64 arithmetic).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from qlora.kernels import c_extension
from qlora.nn import LoRALinear, QuantLinear
from qlora.nn.dropout import apply_dropout, draw_seeds, keep_mask_reference
from qlora.nn.lora_fused import fused_lora_supported

requires_kernel = pytest.mark.skipif(c_extension("ops") is None, reason="C ops kernel not built")


def _layer(kind: str, bias: bool, dropout: float, out: int = 96, inp: int = 80) -> LoRALinear:
    linear = nn.Linear(inp, out, bias=bias)
    linear.requires_grad_(False)
    base = QuantLinear.from_linear(linear, "nf4") if kind == "nf4" else linear
    layer = LoRALinear(base, "default", r=8, alpha=16, dropout=dropout)
    with torch.no_grad():  # a trained-looking B, so the adapter path contributes
        layer.lora_B["default"].weight.normal_(0, 0.1)
    return layer


def _grads(layer: LoRALinear, x: torch.Tensor, forward) -> list[torch.Tensor]:
    x = x.detach().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    y = forward(x)
    y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
    return [
        y.detach(),
        x.grad,
        layer.lora_A["default"].weight.grad,
        layer.lora_B["default"].weight.grad,
    ]


# -- dropout -----------------------------------------------------------------------------------


@requires_kernel
@pytest.mark.parametrize("numel", [1, 7, 1000, 70_001, 300_000])
@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_kernel_mask_equals_reference(numel: int, p: float) -> None:
    seeds = draw_seeds()
    x = torch.rand(numel) + 0.5  # never zero, so zeros in the output are exactly the drops
    out = apply_dropout(x, seeds, p)
    keep = keep_mask_reference(numel, seeds, p)
    assert torch.equal(out != 0, keep)
    assert torch.equal(out, torch.where(keep, x * (1.0 / (1.0 - p)), torch.zeros(())))


def test_reference_fallback_matches_kernel_formula() -> None:
    """Non-float32 inputs take the PyTorch path: same mask."""
    seeds, p = (12345, 67890), 0.2
    x = torch.rand(5000, dtype=torch.float64) + 0.5
    out = apply_dropout(x, seeds, p)
    assert torch.equal(out != 0, keep_mask_reference(5000, seeds, p))


def test_accumulate_into_out() -> None:
    seeds, p = draw_seeds(), 0.3
    x, base = torch.randn(4, 1000), torch.randn(4, 1000)
    out = base.clone()
    apply_dropout(x, seeds, p, out=out)
    torch.testing.assert_close(out, base + apply_dropout(x, seeds, p), rtol=0, atol=1e-6)


def test_mask_statistics() -> None:
    """Drop rate p per element and per column; masks of different seeds independent."""
    p, rows, cols = 0.1, 2000, 512
    first = keep_mask_reference(rows * cols, draw_seeds(), p).view(rows, cols).float()
    second = keep_mask_reference(rows * cols, draw_seeds(), p).view(rows, cols).float()
    n = rows * cols
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs((1 - first.mean()) - p) < 5 * sigma
    column_rates = 1 - first.mean(0)  # each column over 2000 rows
    assert (column_rates - p).abs().max() < 6 * (p * (1 - p) / rows) ** 0.5
    both_dropped = ((1 - first) * (1 - second)).mean()
    assert abs(both_dropped - p * p) < 6 * (p * p / n) ** 0.5
    neighbours = ((1 - first[:, 1:]) * (1 - first[:, :-1])).mean()  # adjacent indices
    assert abs(neighbours - p * p) < 6 * (p * p / n) ** 0.5


def test_seeds_follow_torch_generator() -> None:
    torch.manual_seed(3)
    a = draw_seeds()
    torch.manual_seed(3)
    assert draw_seeds() == a
    assert draw_seeds() != a


# -- fused LoRA --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dense", "nf4"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(5, 80), (2, 3, 80)])
def test_fused_matches_reference_without_dropout(kind: str, bias: bool, shape: tuple) -> None:
    layer = _layer(kind, bias, dropout=0.0)
    x = torch.randn(shape)
    assert fused_lora_supported(layer.base_layer, x, layer.lora_A["default"].weight, nn.Identity())
    fused = _grads(layer, x, layer)
    reference = _grads(layer, x, layer.reference_forward)
    for got, want in zip(fused, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@requires_kernel
@pytest.mark.parametrize("kind", ["dense", "nf4"])
def test_fused_dropout_matches_reference_with_the_same_mask(kind: str) -> None:
    p = 0.25
    layer = _layer(kind, bias=True, dropout=p).train()
    x = torch.randn(6, 80)
    torch.manual_seed(11)
    fused = _grads(layer, x, layer)
    torch.manual_seed(11)
    seeds = draw_seeds()  # the words the fused call drew
    keep = keep_mask_reference(x.numel(), seeds, p).view(x.shape)

    def reference(inp: torch.Tensor) -> torch.Tensor:
        dropped = torch.where(keep, inp * (1.0 / (1.0 - p)), torch.zeros(()))
        hidden = layer.lora_A["default"](dropped)
        return layer.base_layer(inp) + layer.lora_B["default"](hidden) * layer.scaling["default"]

    want = _grads(layer, x, reference)
    for got, expected in zip(fused, want, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.equal(fused[0], _grads(layer, x, layer.eval())[0])  # dropout did act


@requires_kernel
def test_fused_dropout_under_checkpointing_regenerates_the_mask() -> None:
    """Non-reentrant checkpointing restores the RNG: the recomputed seeds are the same."""
    layer = _layer("nf4", bias=False, dropout=0.1).train()
    x = torch.randn(6, 80)
    torch.manual_seed(5)
    plain = _grads(layer, x, layer)
    torch.manual_seed(5)
    checkpointed = _grads(layer, x, lambda t: checkpoint(layer, t, use_reentrant=False))
    for got, want in zip(checkpointed, plain, strict=True):
        assert torch.equal(got, want)


def test_input_without_grad_and_frozen_adapter() -> None:
    layer = _layer("dense", bias=False, dropout=0.0)
    layer.lora_A["default"].weight.requires_grad_(False)
    x = torch.randn(4, 80)  # no requires_grad: as the first layer's input
    y = layer(x)
    y.sum().backward()
    assert layer.lora_A["default"].weight.grad is None
    assert layer.lora_B["default"].weight.grad is not None
    torch.testing.assert_close(y, layer.reference_forward(x), rtol=1e-5, atol=1e-5)


def test_fused_saves_only_the_input() -> None:
    """Tensors autograd keeps for one layer: x, h [T, r], A and B - no mask, no dropped copy."""
    layer = _layer("nf4", bias=False, dropout=0.1).train()
    x = torch.randn(64, 80, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x)
    sizes = sorted(t.numel() for t in saved)
    assert sizes == sorted([64 * 80, 64 * 8, 8 * 80, 96 * 8])


@pytest.mark.parametrize(
    "case", ["bfloat16", "two adapters", "merged", "trainable base", "custom dropout"]
)
def test_unsupported_cases_use_the_reference(case: str) -> None:
    layer = _layer("dense", bias=False, dropout=0.0)
    x = torch.randn(3, 80)
    if case == "bfloat16":
        layer = layer.to(torch.bfloat16)
        x = x.to(torch.bfloat16)
    elif case == "two adapters":
        layer.add_adapter("other", r=4, alpha=4)
        layer.set_adapter(["default", "other"])
    elif case == "merged":
        from qlora.nn import merge_adapter

        merge_adapter(layer)
    elif case == "trainable base":
        layer.base_layer.weight.requires_grad_(True)
    else:
        layer.lora_dropout["default"] = nn.AlphaDropout(0.0)
    torch.testing.assert_close(layer(x), layer.reference_forward(x))
    name = layer.active_adapters[0]
    supported = fused_lora_supported(
        layer.base_layer, x, layer.lora_A[name].weight, layer.lora_dropout[name]
    )
    if case in ("bfloat16", "trainable base", "custom dropout"):
        assert not supported
