"""The fused LoRA layer: frozen base matmul, dropout and both adapter matmuls in one Function.

`LoRALinear.forward` composed from modules (base layer, ``nn.Dropout``, two ``nn.Linear``, a
scaling multiply and an add) is the reference. Autograd then keeps, per adapted layer, the
dropout mask and the dropped-out input copy (5 bytes per input element), the adapter's hidden
output, and runs six small element-wise passes besides the matmuls. `fused_lora` computes the
same function with the gradients written out by hand:

Let x ∈ R^{T×k} be the input rows, W ∈ R^{n×k} the frozen base weight (dense, or dequantized
on the fly from its 4-bit codes), b its optional bias, A ∈ R^{r×k}, B ∈ R^{n×r} the adapter,
s the scaling and D(·) dropout with keep-mask m ∈ {0,1}^{T×k} and c = 1/(1−p):

    D(x) = c · m ⊙ x            h = D(x) Aᵀ  [T, r]          y = x Wᵀ + b + s · h Bᵀ  [T, n]

Given g = ∂L/∂y [T, n]:

    ∂L/∂B = s · gᵀ h                                      [n, r]
    u     := ∂L/∂h = s · g B                              [T, r]
    ∂L/∂A = uᵀ D(x)                                       [r, k]
    ∂L/∂x = g W + c · m ⊙ (u A)                           [T, k]
    ∂L/∂W, ∂L/∂b: never formed (frozen)

Saved between the passes: x (shared by every adapter that reads the same tensor - q, k and
v read one normed hidden state - so it is one buffer, not three), h ([T, r], tiny), A, B and
the two dropout seed words; never the mask, D(x), or a dequantized weight. D(x) is rebuilt in
backward from the seeds (`qlora.nn.dropout`); the extra dropout pass costs ~1 ns per element,
against ~10 ns for drawing a Bernoulli mask. The scaling is folded into the matmuls (addmm's
alpha), so there is no separate multiply or add over [T, n].

The result equals the reference's up to float rounding (the same products summed in another
order: s · (h Bᵀ) is computed as one addmm) for any p; with p > 0 the keep-mask comes from the
counter-based generator instead of ``nn.Dropout``'s Bernoulli draws (same distribution).
Tests compare the two paths, outputs and all three gradients, with the reference given the
same mask.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from qlora.kernels import c_extension
from qlora.nn.cast_linear import CastLinear
from qlora.nn.dropout import apply_dropout, draw_seeds
from qlora.nn.qlinear import QuantLinear, dequantize_for_matmul, fast_decoding_applies
from qlora.quant.scratch import rounded_copy, scratch

__all__ = ["base_compute_dtype", "fused_lora", "fused_lora_supported"]


def base_compute_dtype(base: nn.Module) -> torch.dtype:
    """The dtype the frozen base multiplies in: a QuantLinear's compute dtype, else its
    weight's own dtype."""
    if isinstance(base, QuantLinear | CastLinear):
        return base.compute_dtype
    return base.weight.dtype


def _base_weight(base: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The frozen weight [n, k] as the base's own forward multiplies by it."""
    if isinstance(base, QuantLinear):
        return dequantize_for_matmul(base.quant_state, dtype)  # reused buffer: use at once
    return base.weight.detach().to(dtype)  # a CastLinear under float32_compute: widened


def _times(rows: torch.Tensor, matrix: torch.Tensor, slot: str) -> torch.Tensor:
    """rows [T, k] @ matrix [k, n] in the matrix's dtype (the base's compute dtype), returned
    in the rows' dtype.

    With a bfloat16 base the float32 rows are rounded to bf16 for the product and the product
    comes back to float32 (what `QuantLinear.forward` computes). The rounded rows and the bf16
    product live in per-thread scratch buffers (`qlora.quant.scratch`): fresh [T, k] and
    [T, n] tensors on every call would each be new memory to fault in, which costs more than
    the rounding itself.
    """
    if rows.dtype == matrix.dtype:
        return rows @ matrix
    # q, k and v read one normed hidden state, gate and up another: one rounding pass each
    narrow = rounded_copy(rows, matrix.dtype, slot, reuse=slot == "input")  # [T, k]
    product = scratch((rows.shape[0], matrix.shape[1]), matrix.dtype, "product")  # [T, n]
    return torch.mm(narrow, matrix, out=product).to(rows.dtype)


def _dropped(x: torch.Tensor, seeds: tuple[int, int] | None, p: float) -> torch.Tensor:
    """D(x) [T, k] in a reused per-thread buffer (consumed by the next matmul), or x itself."""
    if seeds is None:
        return x
    return apply_dropout(x, seeds, p, into=scratch(x.shape, x.dtype, "dropout"))


class _FusedLoRA(torch.autograd.Function):
    """y = x Wᵀ + b + s · (D(x) Aᵀ) Bᵀ; gradients for x, A and B (see the module docstring)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,  # [T, k]
        weight_a: torch.Tensor,  # [r, k]
        weight_b: torch.Tensor,  # [n, r]
        base: nn.Module,
        scaling: float,
        p: float,
        seeds: tuple[int, int] | None,
    ) -> torch.Tensor:
        weight = _base_weight(base, base_compute_dtype(base))  # [n, k]
        bias = base.bias
        if bias is not None and weight.dtype == x.dtype:
            y = torch.addmm(bias.detach().to(x.dtype), x, weight.t())  # [T, n]
        else:
            y = _times(x, weight.t(), "input")  # [T, n]
            if bias is not None:
                y.add_(bias.detach().to(y.dtype))
        del weight
        dropped = _dropped(x, seeds, p)  # [T, k]
        h = dropped @ weight_a.t()  # [T, r]
        del dropped
        y.addmm_(h, weight_b.t(), alpha=scaling)
        ctx.save_for_backward(x, h, weight_a, weight_b)
        ctx.base, ctx.scaling, ctx.p, ctx.seeds = base, scaling, p, seeds
        return y

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, h, weight_a, weight_b = ctx.saved_tensors
        grads = lora_backward(
            ctx, grad_y.contiguous(), x, h, weight_a, weight_b, ctx.needs_input_grad[:3]
        )
        return *grads, None, None, None, None


def lora_backward(
    ctx: Any,
    grad_y: torch.Tensor,  # [T, n]
    x: torch.Tensor,  # [T, k]
    h: torch.Tensor,  # [T, r]
    weight_a: torch.Tensor,  # [r, k]
    weight_b: torch.Tensor,  # [n, r]
    needs: tuple[bool, ...],  # x, A, B
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(∂L/∂x, ∂L/∂A, ∂L/∂B) from g = ``grad_y`` (the module docstring's formulas); ``ctx``
    holds base, scaling, p and seeds. DoRA's backward is this with g scaled per column."""
    need_x, need_a, need_b = needs
    scaling, seeds = ctx.scaling, ctx.seeds
    grad_b = torch.mm(grad_y.t(), h).mul_(scaling) if need_b else None  # [n, r]
    grad_h = torch.mm(grad_y, weight_b).mul_(scaling)  # u: [T, r]
    grad_a = None
    if need_a:
        dropped = _dropped(x, seeds, ctx.p)  # [T, k]
        grad_a = grad_h.t() @ dropped  # [r, k]
        del dropped
    grad_x = None
    if need_x:
        weight = _base_weight(ctx.base, base_compute_dtype(ctx.base))  # [n, k]
        grad_x = _times(grad_y, weight, "grad")  # [T, k]
        del weight
        if seeds is not None:
            lora_grad = torch.mm(grad_h, weight_a, out=scratch(grad_x.shape, x.dtype, "dropout"))
            apply_dropout(lora_grad, seeds, ctx.p, out=grad_x)
        else:
            grad_x.addmm_(grad_h, weight_a)
    return grad_x, grad_a, grad_b


def fused_lora_supported(
    base: nn.Module, x: torch.Tensor, weight_a: torch.Tensor, dropout: nn.Module
) -> bool:
    """Whether `fused_lora` computes this layer: float32 activations and adapters on the CPU,
    a plain frozen base multiplying in float32 or bfloat16.

    Elsewhere (CUDA, half-precision activations, custom bases, dropout modules other than
    ``nn.Dropout`` or ``nn.Identity``) `LoRALinear` composes its modules, the reference path.
    """
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight_a.dtype != torch.float32:
        return False
    if not isinstance(dropout, nn.Identity | nn.Dropout):
        return False
    dropping = isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0
    if dropping and c_extension("ops") is None:
        return False
    if isinstance(base, QuantLinear):
        if fast_decoding_applies(x, base.quant_state):
            return False  # decoding: the base's own fused matvec beats dequantizing it here
        return base.compute_dtype in (torch.float32, torch.bfloat16)
    if type(base) is CastLinear:
        compute_ok = base.compute_dtype in (torch.float32, torch.bfloat16)
    else:  # a plain Linear multiplies in its own dtype, which must be the activations'
        compute_ok = type(base) is nn.Linear and base.weight.dtype == torch.float32
    return (
        compute_ok
        and not base.weight.requires_grad
        and (base.bias is None or not base.bias.requires_grad)
    )


def fused_lora(
    x: torch.Tensor,
    base: nn.Module,
    lora_a: nn.Linear,
    lora_b: nn.Linear,
    dropout: nn.Module,
    scaling: float,
) -> torch.Tensor:
    """base(x) + scaling · lora_b(lora_a(dropout(x))) for x [.., k] -> [.., n] (see above)."""
    p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
    seeds = draw_seeds() if p > 0 else None
    rows = x.reshape(-1, x.shape[-1]).contiguous()  # [T, k]
    y = _FusedLoRA.apply(rows, lora_a.weight, lora_b.weight, base, scaling, p, seeds)
    return y.view(*x.shape[:-1], y.shape[-1])
