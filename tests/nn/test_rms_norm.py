"""RMSNorm: forward bit-identical to transformers', backward against autograd's."""

from __future__ import annotations

import pytest
import torch

from qlora.kernels import c_extension
from qlora.nn.rms_norm import RMSNorm, fuse_norms, rms_norm_backward
from tests.tiny_models import tiny_causal_lm

requires_kernel = pytest.mark.skipif(
    not hasattr(c_extension("ops"), "rms_norm_backward"), reason="C ops kernel not built"
)


def _transformers_norm(d: int, seed: int = 0) -> torch.nn.Module:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(d, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(d, generator=torch.Generator().manual_seed(seed)))
    return norm.requires_grad_(False)


@pytest.mark.parametrize("shape", [(3, 576), (2, 129, 64), (4, 256, 576)])
def test_gradient_equals_autograd_and_forward_is_identical(shape: tuple[int, ...]) -> None:
    reference = _transformers_norm(shape[-1])
    ours = RMSNorm.from_norm(reference)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 3
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours, y_ref = ours(a), reference(b)
    assert torch.equal(y_ours, y_ref)
    assert y_ours.grad_fn is not None and "RMSNorm" in type(y_ours.grad_fn).__name__
    y_ours.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)


@requires_kernel
def test_kernel_equals_the_torch_formula(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(300, 96, generator=torch.Generator().manual_seed(0))
    grad, weight = torch.randn(300, 96), torch.randn(96)
    rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    kernel = rms_norm_backward(grad, x, rstd, weight)
    formula = rms_norm_backward(grad.double(), x.double(), rstd.double(), weight.double())
    torch.testing.assert_close(kernel, formula.float(), rtol=1e-5, atol=1e-5)


def test_a_trained_weight_or_no_gradient_takes_autograd() -> None:
    reference = _transformers_norm(32)
    ours = RMSNorm.from_norm(reference)
    x = torch.randn(5, 32)
    with torch.no_grad():
        assert torch.equal(ours(x), reference(x))
    ours.weight.requires_grad_(True)
    y = ours(x.requires_grad_())
    assert "RMSNorm" not in type(y.grad_fn).__name__
    y.sum().backward()
    assert ours.weight.grad is not None


def test_saves_what_autograd_saves_and_no_more() -> None:
    """x, r and the weight: autograd keeps the same three for a frozen weight (the gain is
    the one-pass backward, not memory)."""
    reference = _transformers_norm(256)
    ours = RMSNorm.from_norm(reference)

    def saved(norm: torch.nn.Module) -> int:
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            norm(torch.randn(64, 256, requires_grad=True))
        return sum(seen.values())

    assert saved(ours) == saved(reference) == 64 * 256 * 4 + 64 * 4 + 256 * 4


@pytest.mark.parametrize("arch", ["Llama", "Mistral", "Qwen2", "Qwen3"])
def test_fuse_norms_keeps_the_model_and_its_logits(arch: str) -> None:
    model = tiny_causal_lm(arch, seed=0)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    keys = set(model.state_dict())
    with torch.no_grad():
        before = model(ids).logits
    assert fuse_norms(model) >= 2 * 2 + 1
    assert not any(type(m).__name__.endswith("RMSNorm") and type(m) is not RMSNorm
                   for m in model.modules())  # fmt: skip
    assert set(model.state_dict()) == keys
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
