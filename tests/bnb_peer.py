"""Running a transformers + bitsandbytes model as the exactness oracle for our NF4 layers.

bitsandbytes' `Linear4bit` has two CPU paths. In training mode (or when the input needs a
gradient) it dequantizes the weight and multiplies in the compute dtype: with float32 compute
that is exactly what our layers do, so logits must agree bit for bit. In eval mode without
gradients, on a CPU with AVX512-BF16 (bitsandbytes 0.50: `support_avx512bf16_for_cpu`), it
repacks the weight at the first call and runs a fused kernel with bfloat16 activations: close
to ours, not equal, and on other CPUs the plain path again. The helpers below take the exact
path on purpose (train mode; tiny Llama has no dropout, so the function is the same) and
check the inference path only to bfloat16 accuracy. The exact call must come first: once
repacked, the weight stays in the fused layout whatever the mode.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["bnb_exact_logits", "check_bnb_inference_logits"]

BF16_ATOL = 2e-2  # bfloat16 activations over two tiny layers: 5e-3 measured


def _forward(model: nn.Module, ids: torch.Tensor, training: bool) -> torch.Tensor:
    assert getattr(model.config, "attention_dropout", 0.0) == 0.0, "train mode must be exact"
    was_training = model.training
    model.train(training)
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        model.train(was_training)


def bnb_exact_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits through bitsandbytes' dequantize-then-matmul path (call before any eval forward)."""
    return _forward(model, ids, training=True)


def check_bnb_inference_logits(
    model: nn.Module, ids: torch.Tensor, reference: torch.Tensor
) -> None:
    """bitsandbytes' inference path agrees with `reference` to bfloat16 accuracy."""
    logits = _forward(model, ids, training=False)
    torch.testing.assert_close(logits, reference, atol=BF16_ATOL, rtol=0.0)
