"""The Triton dequantize kernel against the reference, bit for bit.

On a CUDA machine it runs on the GPU through `dequantize`; without one, on the CPU under
Triton's interpreter (``TRITON_INTERPRET=1``, set in conftest), which executes the same
kernel program.
"""

import pytest
import torch

from qlora.quant import KINDS, dequantize, dequantize_reference, quantize
from qlora.quant.blockwise import dequantize_absmax

from ..conftest import requires_cuda, requires_triton

pytestmark = requires_triton


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("shape", "blocksize"), [((300, 70), 64), ((5000,), 32), ((3, 3), 4096)])
def test_triton_kernel_matches_reference(
    kind: str, out_dtype: torch.dtype, shape: tuple[int, ...], blocksize: int
) -> None:
    from qlora.kernels.triton_dequant import dequantize_triton

    device = "cuda" if torch.cuda.is_available() else "cpu"
    state = quantize(torch.randn(shape) * 0.05, kind, blocksize, double_quant=True).to(device)
    out = torch.empty(state.numel, dtype=out_dtype, device=device)
    dequantize_triton(
        state.packed, dequantize_absmax(state).contiguous(), state.code, out, blocksize, state.bits
    )
    expected = dequantize_reference(state, out_dtype).reshape(-1)
    assert torch.equal(out, expected)


def test_bf16_rounding_is_nearest_even() -> None:
    """Values chosen so that truncation and round-to-nearest-even differ."""
    from qlora.kernels.triton_dequant import dequantize_triton

    state = quantize(torch.randn(4096) * 3.3, "nf4", 64, double_quant=False)
    out = torch.empty(4096, dtype=torch.bfloat16)
    dequantize_triton(state.packed, state.absmax, state.code, out, 64, 4)
    truncated = (
        (dequantize_reference(state, torch.float32).view(torch.int32) >> 16)
        .to(torch.int16)
        .view(torch.bfloat16)
    )
    assert not torch.equal(out, truncated)
    assert torch.equal(out, dequantize_reference(state, torch.bfloat16))


@requires_cuda
@pytest.mark.gpu
def test_dispatcher_uses_triton_on_cuda() -> None:
    state = quantize(torch.randn(4096, 4096), "nf4", 64).to("cuda")
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(dequantize(state, dtype), dequantize_reference(state, dtype))
