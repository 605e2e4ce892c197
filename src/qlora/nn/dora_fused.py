"""The fused DoRA layer: `qlora.nn.lora_fused`'s one Function, with DoRA's row rescaling.

With x ∈ R^{T×k}, the frozen W ∈ R^{n×k} (dense, or dequantized on the fly from its k-bit
codes) and bias b, the adapter A ∈ R^{r×k}, B ∈ R^{n×r}, scaling s, the magnitude
m ∈ R^n and dropout D(·) on the adapter's input (keep-mask M, c = 1/(1−p)):

    h = D(x) Aᵀ  [T, r]      z = x Wᵀ + s · h Bᵀ  [T, n]      f = m / ν  [n]
    y = f ⊙ z + b                                              (f scales each column)

where ν = ‖W + s·B·A‖ per row, a constant in backward (DoRA §4.3), computed in the forward
from the same dequantized W by `qlora.nn.dora`'s closed form (W·Aᵀ costs an [n, k] x [k, r]
product, beside the [T, k] x [k, n] one). Given g = ∂L/∂y [T, n] and g' = g ⊙ f:

    ∂L/∂m = (Σ_t g ⊙ z) / ν                               [n]   (column sums)
    ∂L/∂B = s · g'ᵀ h                                     [n, r]
    u     := s · g' B                                     [T, r]
    ∂L/∂A = uᵀ D(x)                                       [r, k]
    ∂L/∂x = g' W + c · M ⊙ (u A)                          [T, k]

That is the LoRA backward with g' for g, plus one column-sum for the magnitude: no second
pass of the base matmul. z is not kept: the Function saves its output y, which the next op
usually keeps anyway (SwiGLU keeps gate_proj's and up_proj's outputs), and backward reads
z = (y − b) / f back, a relative rounding of ~1 float32 ulp in ∂L/∂m. (Where some f_j is 0,
z cannot be read back, so z itself is saved instead.)

Dropout: with p > 0 in training only the adapter's input is dropped, as in plain LoRA. PEFT
instead adds (f − 1) ⊙ D(x) Wᵀ to the base output of the whole x, a second base matmul in
forward and in backward - that is most of why its DoRA trains 1.7-2x slower. The two agree
in expectation (E[D(x)] = x) and exactly whenever dropout is off (p = 0, or eval); the
composed `LoRALinear.reference_forward` keeps PEFT's form. Tests compare this Function with a
dense autograd reference of the formulas above, with the same mask.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from qlora.nn.dora import norm_from_products
from qlora.nn.dropout import draw_seeds
from qlora.nn.lora_fused import _base_weight, _dropped, lora_backward

__all__ = ["fused_dora"]


class _FusedDoRA(torch.autograd.Function):
    """y = (m / ν) ⊙ (x Wᵀ + s · D(x) Aᵀ Bᵀ) + b; gradients for x, A, B and m."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,  # [T, k]
        weight_a: torch.Tensor,  # [r, k]
        weight_b: torch.Tensor,  # [n, r]
        magnitude: torch.Tensor,  # [n]
        base: nn.Module,
        row_norms_sq: torch.Tensor,  # [n] float64: ‖W_j‖²
        scaling: float,
        p: float,
        seeds: tuple[int, int] | None,
    ) -> torch.Tensor:
        weight = _base_weight(base, x.dtype)  # [n, k]
        # ν = ‖W + s·B·A‖ per row, by the closed form (qlora.nn.dora.weight_norm)
        w_at = weight @ weight_a.t()  # [n, r]
        norm = norm_from_products(w_at, row_norms_sq, weight_a, weight_b, scaling).to(x.dtype)
        factor = magnitude / norm  # [n]
        z = x @ weight.t()  # [T, n]
        del weight
        dropped = _dropped(x, seeds, p)  # [T, k]
        h = dropped @ weight_a.t()  # [T, r]
        del dropped
        z.addmm_(h, weight_b.t(), alpha=scaling)
        bias = base.bias
        if bool((factor != 0).all()):
            y = z.mul_(factor)  # in place: z is read back from y
            if bias is not None:
                y.add_(bias.detach().to(y.dtype))
            ctx.save_for_backward(x, h, weight_a, weight_b, factor, norm, y)
            ctx.from_output = True
        else:
            y = z * factor
            if bias is not None:
                y.add_(bias.detach().to(y.dtype))
            ctx.save_for_backward(x, h, weight_a, weight_b, factor, norm, z)
            ctx.from_output = False
        ctx.base, ctx.scaling, ctx.p, ctx.seeds = base, scaling, p, seeds
        return y

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, h, weight_a, weight_b, factor, norm, kept = ctx.saved_tensors
        need_x, need_a, need_b, need_m = ctx.needs_input_grad[:4]
        grad_y = grad_y.contiguous()  # [T, n]
        grad_m = None
        if need_m:
            if ctx.from_output:  # z = (y - b) / f
                bias = ctx.base.bias
                z = kept - bias.detach().to(kept.dtype) if bias is not None else kept.clone()
                z.div_(factor)
            else:
                z = kept
            grad_m = (grad_y * z).sum(dim=0).div_(norm)  # [n]
            del z
        scaled = grad_y * factor  # g': [T, n]
        grad_x, grad_a, grad_b = lora_backward(
            ctx, scaled, x, h, weight_a, weight_b, (need_x, need_a, need_b)
        )
        return grad_x, grad_a, grad_b, grad_m, None, None, None, None, None


def fused_dora(
    x: torch.Tensor,
    base: nn.Module,
    lora_a: nn.Linear,
    lora_b: nn.Linear,
    magnitude: torch.Tensor,
    row_norms_sq: torch.Tensor,
    dropout: nn.Module,
    scaling: float,
) -> torch.Tensor:
    """DoRA's y = (m/ν) ⊙ (x Wᵀ + s·B·A·D(x)) + b for x [.., k] -> [.., n] (see above).

    Where `qlora.nn.lora_fused.fused_lora_supported` holds (float32 on the CPU, a plain
    frozen base). ``row_norms_sq``: ‖W_j‖² of the base (`qlora.nn.dora.base_row_norms_sq`).
    """
    p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
    seeds = draw_seeds() if p > 0 else None
    rows = x.reshape(-1, x.shape[-1]).contiguous()  # [T, k]
    y = _FusedDoRA.apply(
        rows, lora_a.weight, lora_b.weight, magnitude, base, row_norms_sq, scaling, p, seeds
    )
    return y.view(*x.shape[:-1], y.shape[-1])
