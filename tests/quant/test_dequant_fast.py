"""The fast dequantize paths against the slow reference: identical bits, every kind/dtype."""

import pytest
import torch

from qlora.kernels import c_extension
from qlora.quant import KINDS, dequantize, dequantize_reference, quantize

needs_kernel = pytest.mark.skipif(c_extension("cpu") is None, reason="C kernel not built")


@needs_kernel
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(7, 13), (300, 70), (12293,), (512, 640), (1, 1)])
@pytest.mark.parametrize("blocksize", [32, 64, 4096])
def test_cpu_kernel_matches_reference(
    kind: str, out_dtype: torch.dtype, shape: tuple[int, ...], blocksize: int
) -> None:
    state = quantize(torch.randn(shape) * 0.05, kind, blocksize, double_quant=True)
    assert torch.equal(dequantize(state, out_dtype), dequantize_reference(state, out_dtype))


@needs_kernel
def test_cpu_kernel_large_output_uses_streaming_path_and_stays_exact() -> None:
    # > 4 MiB of float32 output takes the non-temporal store branch.
    state = quantize(torch.randn(1536, 1024), "nf4", 64)
    out = torch.empty(1536, 1024)
    assert dequantize(state, torch.float32, out=out) is out
    assert torch.equal(out, dequantize_reference(state, torch.float32))


@needs_kernel
def test_half_precision_rounding_extremes() -> None:
    # Scales that push code*absmax into fp16 subnormals and past its max (inf).
    for scale in (1e-6, 3e-5, 7e4, 1e5):
        state = quantize(torch.randn(4096) * scale, "nf4", 64, double_quant=False)
        for dtype in (torch.float16, torch.bfloat16):
            assert torch.equal(dequantize(state, dtype), dequantize_reference(state, dtype))


def test_out_argument_validation() -> None:
    state = quantize(torch.randn(8, 8), "nf4", 64)
    with pytest.raises(ValueError, match="out must be a contiguous"):
        dequantize(state, torch.float32, out=torch.empty(8, 9))
    out = torch.empty(64, dtype=torch.bfloat16)
    assert torch.equal(
        dequantize(state, torch.bfloat16, out=out), dequantize_reference(state, torch.bfloat16)
    )
