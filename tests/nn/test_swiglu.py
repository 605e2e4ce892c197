"""The SwiGLU MLP: forward bit-identical to transformers', backward against autograd's.

Oracles: ``F.silu(g) * u`` differentiated by autograd, and the transformers MLP module the
fused one replaces.
"""

from __future__ import annotations

import pytest
import torch

from qlora import LoraConfig, QuantConfig, add_lora, quantize_model
from qlora.kernels import c_extension
from qlora.nn.swiglu import (
    SwiGLUMLP,
    _backward_torch,
    fuse_mlps,
    swiglu,
    swiglu_backward,
    swiglu_reference,
)
from tests.tiny_models import tiny_causal_lm, tiny_llama

requires_kernel = pytest.mark.skipif(
    not hasattr(c_extension("ops"), "swiglu_backward"), reason="C ops kernel not built"
)


def _inputs(shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    gate = torch.randn(shape, generator=gen) * 4  # well into both tails of the sigmoid
    gate.view(-1)[:4] = torch.tensor([-100.0, 100.0, 0.0, -88.0])
    return gate, torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)


@pytest.mark.parametrize("shape", [(5,), (5, 17), (2, 300, 1536)])
def test_gradients_equal_autograd(shape: tuple[int, ...]) -> None:
    gate, up, grad = _inputs(shape)
    g1, u1 = gate.clone().requires_grad_(), up.clone().requires_grad_()
    h = swiglu(g1, u1)
    h.backward(grad)
    g2, u2 = gate.clone().requires_grad_(), up.clone().requires_grad_()
    reference = swiglu_reference(g2, u2)
    reference.backward(grad)
    assert torch.equal(h, reference)  # forward: transformers' own two operations
    torch.testing.assert_close(g1.grad, g2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(u1.grad, u2.grad, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(g1.grad).all()


@requires_kernel
def test_kernel_equals_the_torch_formula() -> None:
    gate, up, grad = _inputs((4096, 3))  # above the threads' split size, odd length
    kernel = swiglu_backward(grad, gate, up)
    formula = _backward_torch(grad, gate, up)
    for got, want in zip(kernel, formula, strict=True):
        torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6)


def test_other_dtypes_and_strides_take_the_torch_formula() -> None:
    gate, up, grad = (t.double() for t in _inputs((6, 5)))
    g = gate.clone().requires_grad_()
    swiglu(g, up.t().contiguous().t()).backward(grad)
    want = _backward_torch(grad, gate, up)[0]
    torch.testing.assert_close(g.grad, want)


def test_saves_two_tensors_where_autograd_saves_three() -> None:
    def saved_bytes(fn) -> int:
        total = [0]

        def pack(t: torch.Tensor) -> torch.Tensor:
            total[0] += t.numel() * t.element_size()
            return t

        gate, up, _ = _inputs((64, 256))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(gate.requires_grad_(), up.requires_grad_())
        return total[0]

    one = 64 * 256 * 4
    assert saved_bytes(swiglu) == 2 * one
    assert saved_bytes(swiglu_reference) == 3 * one


@pytest.mark.parametrize("arch", ["Llama", "Mistral", "Qwen2", "Qwen3"])
def test_fuse_mlps_keeps_the_model_and_its_logits(arch: str) -> None:
    model = tiny_causal_lm(arch, seed=0)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    keys = set(model.state_dict())
    with torch.no_grad():
        before = model(ids).logits
    assert fuse_mlps(model) == 2
    assert all(isinstance(layer.mlp, SwiGLUMLP) for layer in model.model.layers)
    assert set(model.state_dict()) == keys  # the same projections under the same names
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    assert fuse_mlps(model) == 0  # idempotent


def test_trained_adapters_get_the_same_gradients_fused_or_not() -> None:
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    grads = []
    for fuse in (False, True):
        model = quantize_model(tiny_llama(seed=0), QuantConfig(kind="nf4", compute_dtype="float32"))
        if fuse:
            fuse_mlps(model)
        torch.manual_seed(2)
        add_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.05)
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_the_loader_fuses_the_default_architectures(tmp_path) -> None:
    from qlora import load_model

    tiny_llama(seed=0).save_pretrained(tmp_path)
    model, _ = load_model(tmp_path, quant="nf4", tokenizer=False, progress=False)
    assert all(isinstance(layer.mlp, SwiGLUMLP) for layer in model.model.layers)
