"""DoRA's weight norm: the per-row length of W + s·B·A without forming W + s·B·A.

DoRA (Liu et al., 2024) splits an adapted weight into a trainable magnitude per output row
and a direction: W' = m ⊙ (W + s·B·A) / ‖W + s·B·A‖_row, so a layer's output is

    y = bias + (m / n) ⊙ (W x + s·B·A x),    n_j = ‖W_j + s·(B·A)_j‖₂   (j: output row)

with n treated as a constant in backward (the paper's §4.3, and PEFT): no gradient flows
through the norm. PEFT computes n every step by materializing W + s·B·A, a dense [out, in]
float matrix per layer; over a 4-bit base that means dequantizing the whole weight and
keeping a float copy alive through the step, which is why its DoRA trains 1.7-2x slower than
its LoRA and needs far more memory.

The norm has a closed form in quantities that are small or fixed:

    n_j² = ‖W_j‖² + 2s·⟨W_j, (B·A)_j⟩ + s²·‖(B·A)_j‖²
         = c_j    + 2s·Σ_k B_jk (W·Aᵀ)_jk + s²·Σ_k B_jk (B·G)_jk,     G = A·Aᵀ  [r, r]

* c_j = ‖W_j‖² depends on the frozen base only: computed once (`base_row_norms_sq`, from the
  dequantized weight, in float64) and kept as an [out] vector;
* W·Aᵀ [out, r] is the base weight applied to the r rows of A as if they were tokens
  (dequantized into the per-thread scratch buffer the base's own matmul uses, never kept;
  r is 8-64 and a batch has thousands of tokens, so this is a fraction of a step's matmul);
* G and B·G are r x r and out x r.

Rounding: c_j is exact to float64; the two cross terms are float32 sums of r-length dot
products of the base output, so n_j carries a relative error of a few float32 ulps of
max(‖W_j‖², s‖(BA)_j‖·‖W_j‖) - against PEFT's direct float32 norm the two agree to ~1e-7
relative (tested). The subtraction cannot cancel catastrophically in the way a difference of
large numbers would matter for the result: n² is a sum whose exact value is ≥ 0 and, at the
start (B = 0), equals c. `reference_weight_norm` is the direct form, the test oracle.
"""

from __future__ import annotations

import torch
from torch import nn

from qlora.nn.qlinear import QuantLinear, dequantize_for_matmul

__all__ = [
    "base_row_norms_sq",
    "dense_base_weight",
    "norm_from_products",
    "reference_weight_norm",
    "weight_norm",
]


def dense_base_weight(base: nn.Module) -> torch.Tensor:
    """The base layer's weight [out, in] in float32 (a QuantLinear's exact dequantization)."""
    if isinstance(base, QuantLinear):
        return base.dequantized_weight(torch.float32)
    return base.weight.detach().float()


def _scratch_weight(base: nn.Module) -> torch.Tensor:
    """`dense_base_weight` without a new [out, in] tensor where it can be avoided: a
    QuantLinear dequantizes into its per-thread scratch buffer (consume at once), a float32
    nn.Linear gives its own weight. Adding adapters to 200 layers must not leave 200 freed
    weight-sized blocks in the heap (glibc keeps them: +600 MB RSS on the default model)."""
    if isinstance(base, QuantLinear):
        return dequantize_for_matmul(base.quant_state, torch.float32)
    return base.weight.detach().float()


@torch.no_grad()
def base_row_norms_sq(base: nn.Module) -> torch.Tensor:
    """‖W_j‖² per output row of the base layer, [out], float64 (computed once per base)."""
    weight = _scratch_weight(base)  # [out, in]
    rows = max(1, (1 << 17) // weight.shape[1])  # float64 blocks of ~1 MB
    return torch.cat([block.double().square().sum(dim=1) for block in weight.split(rows)])


@torch.no_grad()
def weight_norm(
    base: nn.Module,
    row_norms_sq: torch.Tensor,
    weight_a: torch.Tensor,
    weight_b: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """n = ‖W + s·B·A‖ per row [out] by the closed form above (float32, no gradient).

    Args:
        base: the frozen base layer (its forward without bias gives W·xᵀ).
        row_norms_sq: `base_row_norms_sq` of ``base``.
        weight_a: A [r, in]. weight_b: B [out, r]. scaling: s.
    """
    a = weight_a.detach().float()  # [r, in]
    b = weight_b.detach().float()  # [out, r]
    return norm_from_products(_base_matmul(base, a).T, row_norms_sq, a, b, scaling)


def norm_from_products(
    w_at: torch.Tensor,
    row_norms_sq: torch.Tensor,
    weight_a: torch.Tensor,
    weight_b: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """The closed form given W·Aᵀ [out, r] and ‖W_j‖² [out] (float64): ν [out], float32."""
    gram = weight_a @ weight_a.T  # [r, r]
    cross = (weight_b * w_at).sum(dim=1)  # [out]  ⟨W_j, (BA)_j⟩
    square = (weight_b * (weight_b @ gram)).sum(dim=1)  # [out]  ‖(BA)_j‖²
    total = row_norms_sq + (2 * scaling) * cross.double() + scaling**2 * square.double()
    return total.clamp_min(0).sqrt().float()


def _base_matmul(base: nn.Module, rows: torch.Tensor) -> torch.Tensor:
    """rows [n, in] -> rows·Wᵀ [n, out] in float32, without the bias, by the float32 weight
    (PEFT's norm is float32 too: a bfloat16 compute dtype would round A)."""
    return torch.nn.functional.linear(rows, _scratch_weight(base))


@torch.no_grad()
def reference_weight_norm(
    weight: torch.Tensor, weight_a: torch.Tensor, weight_b: torch.Tensor, scaling: float
) -> torch.Tensor:
    """The direct form, as PEFT computes it: ‖W + s·B·A‖ per row of a dense [out, in] W."""
    merged = weight.float() + scaling * (weight_b.float() @ weight_a.float())  # [out, in]
    return torch.linalg.norm(merged, dim=1)
