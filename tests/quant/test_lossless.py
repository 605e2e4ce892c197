"""lossless_int8: Q8_0-made weights come back as 8-bit blocks bit for bit; others are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qlora.quant import dequantize
from qlora.quant.lossless import lossless_int8
from qlora.quant.matvec import quantized_matmul_few


def _q8_0_weight(rows: int, cols: int, seed: int) -> torch.Tensor:
    """A float32 weight as llama.cpp would hand it over from Q8_0 blocks (gguf's own code)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize
    from gguf.quants import quantize as gguf_quantize

    values = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    values[0, :32] = 0.0  # an all-zero block
    blocks = gguf_quantize(values, GGMLQuantizationType.Q8_0)
    return torch.from_numpy(gguf_dequantize(blocks, GGMLQuantizationType.Q8_0).copy())


def test_q8_0_weights_come_back_bit_for_bit() -> None:
    pytest.importorskip("gguf")
    weight = _q8_0_weight(48, 128, seed=0)
    state = lossless_int8(weight)
    assert state is not None
    assert torch.equal(dequantize(state, torch.float32), weight)
    assert state.packed.numel() == weight.numel()  # 1 byte per value (+ a scale per 32)
    x = torch.randn(3, 128)
    reference = x @ weight.t()
    torch.testing.assert_close(quantized_matmul_few(x, state), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "weight",
    [torch.randn(16, 64), torch.randn(16, 64).bfloat16().float(), torch.randn(16, 48)],
    ids=["float", "bf16-values", "not-whole-blocks"],
)
def test_other_weights_are_refused(weight: torch.Tensor) -> None:
    assert lossless_int8(weight) is None


def test_the_default_models_head_is_q8_0() -> None:
    from qlora import load_model

    model, _ = load_model("smollm2-135m", "nf4")
    head = model.lm_head.weight
    state = lossless_int8(head)
    assert state is not None
    assert torch.equal(dequantize(state, torch.float32), head)
