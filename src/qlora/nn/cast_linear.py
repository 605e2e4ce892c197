"""CastLinear: a frozen full-precision Linear stored and multiplied in a narrower dtype.

The unquantized counterpart of `QuantLinear`'s ``compute_dtype``: with ``quant.kind: null``
and a bfloat16 compute dtype (``auto`` on a CPU with AMX or AVX512-BF16) the target Linear
weights are kept in bf16 - half the memory of float32, and the matmul runs on the bf16
units - while the activations, the bias, the adapters and everything else stay in the model's
dtype. Each forward rounds its input to bf16, multiplies (float32 accumulation inside the
matmul), and returns the product in the input's dtype with the bias added there.

It is an ``nn.Linear`` subclass with the same parameters, so state dicts and adapter targets
see a Linear; only the dtype of ``weight`` differs. Merging an adapter into it works as for a
`QuantLinear` (`qlora.nn.lora.merge_adapter`): the merged weight W + ΔW is a new Linear in
the activations' dtype, the CastLinear set aside untouched - adding a small ΔW into bf16
weights in place would round most of it away.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CastLinear"]


class CastLinear(nn.Linear):
    """``nn.Linear`` whose weight dtype may differ from its input's (see the module docstring).

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        weight_dtype: dtype of the (frozen) weight; the bias keeps ``dtype``.
        dtype, device: as ``nn.Linear`` (the bias's dtype; the activations' dtype).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        weight_dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.full_dtype = self.weight.dtype  # the activations' dtype: a merged copy's
        self.compute_dtype = weight_dtype  # what forward multiplies in (see float32_compute)
        self.weight = nn.Parameter(self.weight.detach().to(weight_dtype), requires_grad=False)
        if self.bias is not None:
            self.bias.requires_grad_(False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, weight_dtype: torch.dtype) -> CastLinear:
        """A CastLinear with ``linear``'s shape, its weight cast to ``weight_dtype`` (works on
        the meta device: a loader's skeleton)."""
        bias = linear.bias
        cast = cls.__new__(cls)
        nn.Module.__init__(cast)
        cast.in_features, cast.out_features = linear.in_features, linear.out_features
        cast.full_dtype = linear.weight.dtype
        cast.compute_dtype = weight_dtype
        weight = linear.weight.detach().to(weight_dtype)
        cast.register_parameter("weight", nn.Parameter(weight, requires_grad=False))
        cast.register_parameter(
            "bias", None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        )
        cast.train(linear.training)
        return cast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [.., in] -> [.., out] in x's dtype."""
        dtype = self.compute_dtype
        out = F.linear(x.to(dtype), self.weight.to(dtype)).to(x.dtype)  # [.., out]
        if self.bias is not None:
            out = out + self.bias.to(x.dtype)
        return out
