"""RMSNorm with a hand-derived backward: our module in place of transformers' RMSNorm.

Llama, Mistral, Qwen2 and Qwen3 normalize with

    r = (mean_j x_j² + ε)^(-1/2)   [rows, 1]          y = w ⊙ (x · r)   [rows, d]

(computed in float32). Composed by autograd that is six operations forward and about ten in
backward, and it keeps the normalized x · r alive besides x itself. With g = ∂L/∂y and the
weight w frozen (LoRA and QLoRA never train it):

    ∂L/∂x_i = r w_i g_i − x_i · r³/d · Σ_j g_j w_j x_j

since ∂r/∂x_i = −r³ x_i / d. `_RMSNorm` saves x and r only, and the C kernel
``rms_norm_backward`` (kernels/ops.c) computes a row's dot product and its gradient in one
visit of the row (the row stays in cache). The forward is transformers' own sequence of
operations, so outputs - and every logit - stay bit-identical to the transformers model's;
gradients agree with autograd's to float32 rounding (tests compare them). A trained weight
(full fine-tuning), other dtypes, or no kernel: the module composes autograd's path.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from qlora.kernels import c_extension
from qlora.nn.inject import replace_module

__all__ = ["FUSED_NORM_CLASSES", "RMSNorm", "fuse_norms", "rms_norm_backward"]

FUSED_NORM_CLASSES = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"})


def _normalize(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x · r in float32, r): transformers' operations, in its order."""
    hidden = x.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    rstd = torch.rsqrt(variance + eps)  # [.., 1]
    return hidden * rstd, rstd


def rms_norm_backward(
    grad: torch.Tensor, x: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """∂L/∂x from g = ``grad`` [.., d] (the module docstring's formula), float32 x."""
    d = x.shape[-1]
    kernel = getattr(c_extension("ops"), "rms_norm_backward", None)
    tensors = (grad, x, rstd, weight)
    if kernel is None or any(
        t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous() for t in tensors
    ):
        gw = grad * weight
        dot = (gw * x).sum(-1, keepdim=True)  # [.., 1]
        return rstd * gw - x * (rstd.pow(3) * dot / d)
    out = torch.empty_like(x)
    kernel(
        grad.data_ptr(),
        x.data_ptr(),
        rstd.data_ptr(),
        weight.data_ptr(),
        out.data_ptr(),
        x.numel() // d,
        d,
        torch.get_num_threads(),
    )
    return out


class _RMSNorm(torch.autograd.Function):
    """y = w ⊙ x · r with w frozen; saves x and r (see the module docstring)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        normed, rstd = _normalize(x, eps)
        ctx.save_for_backward(x, rstd, weight)
        return weight * normed.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        x, rstd, weight = ctx.saved_tensors
        return rms_norm_backward(grad.contiguous(), x, rstd, weight), None, None


class RMSNorm(nn.Module):
    """transformers' RMSNorm (the same ``weight`` and ``variance_epsilon``), with the fused
    backward when its weight is frozen and it runs in float32 with gradients flowing."""

    def __init__(self, weight: nn.Parameter, eps: float) -> None:
        super().__init__()
        self.weight = weight
        self.variance_epsilon = eps

    @classmethod
    def from_norm(cls, norm: nn.Module) -> RMSNorm:
        """The same parameter (not a copy) as transformers' ``norm``."""
        return cls(norm.weight, norm.variance_epsilon)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [.., d] -> [.., d] in x's dtype."""
        fused = (
            x.requires_grad
            and not self.weight.requires_grad
            and x.dtype == torch.float32
            and self.weight.dtype == torch.float32
        )
        if fused:
            return _RMSNorm.apply(x.contiguous(), self.weight, self.variance_epsilon)
        normed, _ = _normalize(x, self.variance_epsilon)
        return self.weight * normed.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


def fuse_norms(model: nn.Module) -> int:
    """Replace every RMSNorm of a class in `FUSED_NORM_CLASSES` by `RMSNorm` over the same
    weight; returns how many were replaced. Works on a meta skeleton."""
    swaps = [
        (name, module)
        for name, module in model.named_modules()
        if type(module).__name__ in FUSED_NORM_CLASSES
    ]
    for name, module in swaps:
        replace_module(model, name, RMSNorm.from_norm(module))
    return len(swaps)
