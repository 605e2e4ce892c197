"""The SwiGLU MLP with a hand-derived backward: our module in place of transformers' MLP.

Llama, Mistral, Qwen2 and Qwen3 compute their MLP as

    g = x W_gᵀ,  u = x W_uᵀ   [T, I]        h = silu(g) ⊙ u   [T, I]        y = h W_dᵀ   [T, d]

with silu(g) = g σ(g). Composed by autograd, ``act_fn(g) * u`` keeps three [T, I] tensors
between the passes (g for SiLU's backward, silu(g) and u for the product's) and runs three
element-wise kernels in backward, each with a full-size temporary. Its gradients by hand,
with ∂h = ∂L/∂h and σ = σ(g):

    ∂L/∂u = ∂h ⊙ silu(g)  = ∂h ⊙ g σ
    ∂L/∂g = ∂h ⊙ u ⊙ silu'(g),   silu'(g) = σ + g σ (1 − σ) = σ (1 + g (1 − σ))

`_SwiGLU` saves only g and u (silu(g) is recomputed: one exp per element, cheaper than
keeping [T, I] floats alive across the step) and computes both gradients in one pass over
memory (the C kernel ``swiglu_backward`` in kernels/ops.c, σ through a vectorized exp within
~1 ulp of expf). The forward is transformers' own two operations, silu then multiply, so the
module's outputs - and every logit - stay bit-identical to the transformers model's; only the
gradients differ from autograd's, by float32 rounding (the tests compare the two).

`SwiGLUMLP` is a plain module holding the same three projections under the same names (so
state dicts, adapter targets and PEFT files are unchanged); `fuse_mlps` swaps it in for the
architectures above while the model is still a meta-device skeleton. Without the C kernel or
on CUDA the backward runs the same formula in torch operations; half-precision activations
take autograd's composition (its silu_backward rounds once, the formula in bf16 would not).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qlora.kernels import c_extension
from qlora.nn.inject import replace_module

__all__ = ["FUSED_MLP_CLASSES", "SwiGLUMLP", "fuse_mlps", "swiglu", "swiglu_reference"]

# transformers' MLP classes whose forward is down(act(gate(x)) * up(x)) with a SiLU act.
FUSED_MLP_CLASSES = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"})


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) ⊙ up composed by autograd: the oracle (transformers' own expression)."""
    return F.silu(gate) * up


def _backward_torch(
    grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    sig = torch.sigmoid(gate)
    grad_up = grad * gate * sig
    grad_gate = grad * up * sig * (1 + gate * (1 - sig))
    return grad_gate, grad_up


def _kernel_applies(*tensors: torch.Tensor) -> bool:
    return all(
        t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors
    )


def swiglu_backward(
    grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(∂L/∂g, ∂L/∂u) from ∂L/∂h (the module docstring's formulas); one C pass where it can."""
    kernel = getattr(c_extension("ops"), "swiglu_backward", None)
    grad = grad.contiguous()
    if kernel is None or not _kernel_applies(grad, gate, up) or grad.shape != gate.shape:
        return _backward_torch(grad, gate, up)
    grad_gate, grad_up = torch.empty_like(gate), torch.empty_like(up)
    kernel(
        grad.data_ptr(),
        gate.data_ptr(),
        up.data_ptr(),
        grad_gate.data_ptr(),
        grad_up.data_ptr(),
        gate.numel(),
        torch.get_num_threads(),
    )
    return grad_gate, grad_up


class _SwiGLU(torch.autograd.Function):
    """h = silu(g) ⊙ u, saving g and u only (see the module docstring)."""

    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate).mul_(up)  # [.., I]: transformers' two operations, in its order

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = ctx.saved_tensors
        return swiglu_backward(grad, gate, up)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) ⊙ up [.., I]; differentiable, with the fused backward when gradients flow."""
    if gate.shape != up.shape or not (gate.requires_grad or up.requires_grad):
        return swiglu_reference(gate, up)  # inference (or broadcasting): transformers' ops
    if gate.dtype != torch.float32 or up.dtype != torch.float32:
        # half precision: autograd's silu_backward computes in float and rounds once; the
        # formula in bf16 operations would round four times
        return swiglu_reference(gate, up)
    return _SwiGLU.apply(gate.contiguous(), up.contiguous())


class SwiGLUMLP(nn.Module):
    """down_proj(silu(gate_proj(x)) ⊙ up_proj(x)), the projections being whatever modules the
    model has there (nn.Linear, QuantLinear, LoRALinear)."""

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self.act_fn = nn.SiLU()  # read by the batch decoder, as transformers' MLP has it

    @classmethod
    def from_mlp(cls, mlp: nn.Module) -> SwiGLUMLP:
        """The same projections (not copies) as transformers' ``mlp``."""
        return cls(mlp.gate_proj, mlp.up_proj, mlp.down_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [.., d] -> [.., d]."""
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def _is_silu(module: nn.Module) -> bool:
    return isinstance(module, nn.SiLU) or type(module).__name__ == "SiLUActivation"


def fuse_mlps(model: nn.Module) -> int:
    """Replace every MLP of a class in `FUSED_MLP_CLASSES` (SiLU activation) by `SwiGLUMLP`
    over the same projections; returns how many were replaced. Works on a meta skeleton."""
    swaps = [
        (name, module)
        for name, module in model.named_modules()
        if type(module).__name__ in FUSED_MLP_CLASSES and _is_silu(getattr(module, "act_fn", None))
    ]
    for name, module in swaps:
        replace_module(model, name, SwiGLUMLP.from_mlp(module))
    return len(swaps)
