"""The C quantize kernel against the plain-PyTorch reference: identical bytes and scales."""

from __future__ import annotations

import pytest
import torch

from qlora.kernels import c_extension
from qlora.quant.blockwise import quantize
from qlora.quant.codebooks import decision_bounds

pytestmark = pytest.mark.skipif(
    c_extension("cpu") is None or not hasattr(c_extension("cpu"), "quantize"),
    reason="the C kernel is not built (or QLORA_DISABLE_KERNELS is set)",
)

KINDS = ["nf4", "fp4", "int8", "nf2"]


def _same(weight: torch.Tensor, kind: str, blocksize: int, dq: bool) -> None:
    fast = quantize(weight, kind, blocksize, dq)
    ref = quantize(weight, kind, blocksize, dq, reference=True)
    assert torch.equal(fast.packed, ref.packed)
    assert torch.equal(fast.absmax, ref.absmax)
    if dq:
        assert torch.equal(fast.nested.absmax, ref.nested.absmax)
        assert fast.nested.offset.item() == ref.nested.offset.item()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("n", [1, 7, 63, 64, 65, 4097, 70_001])
def test_kernel_matches_reference(kind: str, blocksize: int, n: int) -> None:
    _same(torch.randn(n), kind, blocksize, dq=n > 256)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", KINDS)
def test_kernel_matches_reference_for_input_dtypes(dtype: torch.dtype, kind: str) -> None:
    _same((torch.randn(300, 520) * 0.02).to(dtype), kind, 64, dq=True)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("blocksize", [64, 4096])
def test_ties_in_a_partial_last_block(kind: str, blocksize: int) -> None:
    # A last block shorter than blocksize is scaled by division (x / absmax) in the reference,
    # full blocks by the reciprocal; values landing on a midpoint expose any difference.
    gen = torch.Generator().manual_seed(2)
    for _ in range(5):
        weight = (torch.randn(blocksize * 3 + 1224 % blocksize + 5, generator=gen) * 0.2).to(
            torch.bfloat16
        )
        _same(weight, kind, blocksize, dq=False)


@pytest.mark.parametrize("kind", KINDS)
def test_midpoint_ties_zeros_and_signed_zero(kind: str) -> None:
    bounds, _ = decision_bounds(kind)
    # Each block: its absmax is 1, and it holds every exact midpoint, its neighbours, ±0.
    values = torch.cat([bounds, torch.nextafter(bounds, torch.tensor(2.0)), torch.tensor([1.0])])
    values = torch.cat([values, torch.nextafter(bounds, torch.tensor(-2.0)), torch.tensor([-0.0])])
    block = torch.nn.functional.pad(values, (0, -values.numel() % 64))
    block[-1] = 1.0
    weight = torch.cat([block, torch.zeros(64), torch.full((64,), -0.0), torch.tensor([1e-40, 0])])
    _same(weight, kind, 64, dq=False)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_is_an_error_in_both_paths(bad: float) -> None:
    weight = torch.randn(1000)
    weight[700] = bad
    for reference in (False, True):
        with pytest.raises(ValueError, match=r"NaN or inf .* near flat index 640"):
            quantize(weight, "nf4", 64, reference=reference)
