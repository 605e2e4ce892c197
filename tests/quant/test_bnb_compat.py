"""Bit-exactness against the real bitsandbytes (CPU backend): bytes, scales, values."""

import pytest
import torch

from qlora.quant import QuantState, dequantize, dequantize_reference, quantize

from ..conftest import requires_bnb

pytestmark = [pytest.mark.compat, requires_bnb]

SHAPES = [(1,), (7,), (7, 13), (64, 64), (300, 70), (3, 5, 7), (12293,), (1000, 333), (513,)]


def _values_by_the_format(packed: torch.Tensor, state, shape: tuple[int, ...]) -> torch.Tensor:
    """bitsandbytes' 4-bit format read from its own public quant state, no kernel involved:
    value = code[nibble] · absmax[block] (high nibble first), absmax itself dequantized
    blockwise + offset under double quantization, the product rounded once to the dtype."""
    import bitsandbytes.functional as bnbf

    absmax = state.absmax
    if state.nested:
        absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    numel = torch.Size(shape).numel()
    nibbles = torch.stack([packed.view(-1) >> 4, packed.view(-1) & 15], dim=1).view(-1)[:numel]
    blocks = torch.arange(numel) // state.blocksize
    values = state.code[nibbles.long()] * absmax.float()[blocks]
    return values.to(state.dtype).view(shape)


def _bnb_dequantize_4bit(packed: torch.Tensor, state, shape: tuple[int, ...]) -> torch.Tensor:
    """bitsandbytes' own dequantize, except where its kernel disagrees with its own format.

    Found on an AVX-512 CPU (bitsandbytes 0.50.2): the native `dequantize_4bit` kernel reads the
    wrong absmax when a block spans several rows (last dimension a proper divisor of the
    blocksize, e.g. (64, 64) at blocksize 256: from the second block on, values are scaled by
    another block's absmax); the generic path used on other CPUs is right. Only there do we
    fall back to the format definition; anywhere else a disagreement fails the test.
    """
    import bitsandbytes.functional as bnbf

    theirs = bnbf.dequantize_4bit(packed, state)
    defined = _values_by_the_format(packed, state, shape)
    if torch.equal(theirs, defined):
        return theirs
    avx512 = torch.backends.cpu.get_cpu_capability() == "AVX512"
    spans_rows = len(shape) > 1 and shape[-1] < state.blocksize and state.blocksize % shape[-1] == 0
    assert avx512 and spans_rows, f"bitsandbytes dequantize_4bit disagrees with its format {shape}"
    return defined


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("double_quant", [False, True])
def test_quantize_4bit_bit_exact(
    kind: str, dtype: torch.dtype, blocksize: int, double_quant: bool
) -> None:
    import bitsandbytes.functional as bnbf

    for i, shape in enumerate(SHAPES):
        gen = torch.Generator().manual_seed(i)
        w = (torch.randn(shape, generator=gen) * 0.02 * (1 + i)).to(dtype)
        packed, theirs = bnbf.quantize_4bit(
            w, blocksize=blocksize, quant_type=kind, compress_statistics=double_quant
        )
        ours = quantize(w, kind, blocksize, double_quant)
        assert torch.equal(packed.view(-1), ours.packed), f"packed bytes differ for {shape}"
        assert torch.equal(theirs.absmax, ours.absmax), f"absmax differs for {shape}"
        assert torch.equal(theirs.code, ours.code)
        if double_quant:
            assert torch.equal(theirs.state2.absmax, ours.nested.absmax)
            assert torch.equal(theirs.state2.code, ours.nested.code)
            assert torch.equal(theirs.offset, ours.nested.offset)
        expected = _bnb_dequantize_4bit(packed, theirs, shape)
        for ours_values in (dequantize_reference(ours), dequantize(ours)):
            assert ours_values.dtype == expected.dtype
            assert torch.equal(ours_values, expected), f"dequantized values differ for {shape}"


def test_special_values_bit_exact() -> None:
    """Zeros blocks, exact code values, midpoint ties and tiny magnitudes."""
    import bitsandbytes.functional as bnbf

    from qlora.quant.codebooks import codebook, decision_bounds

    for kind in ("nf4", "fp4"):
        bounds, _ = decision_bounds(kind)
        pieces = [
            torch.zeros(64),  # a zero block
            torch.cat([torch.ones(1), bounds, -bounds, torch.zeros(64 - 1 - 2 * 15)]),  # ties
            torch.cat([torch.ones(1), codebook(kind), torch.full((47,), 1e-3)]),
            torch.cat([torch.ones(1), torch.linspace(-0.01, 0.01, 63)]),
            torch.zeros(13),  # a short zero tail block
        ]
        w = torch.cat(pieces)
        for double_quant in (False, True):
            packed, theirs = bnbf.quantize_4bit(
                w, blocksize=64, quant_type=kind, compress_statistics=double_quant
            )
            ours = quantize(w, kind, 64, double_quant)
            assert torch.equal(packed.view(-1), ours.packed)
            assert torch.equal(theirs.absmax, ours.absmax)
            assert torch.equal(bnbf.dequantize_4bit(packed, theirs), dequantize(ours))


def test_dynamic_map_and_blockwise_8bit_match_bitsandbytes() -> None:
    import bitsandbytes.functional as bnbf

    from qlora.quant.blockwise import quantize_dynamic
    from qlora.quant.codebooks import dynamic_map

    assert torch.equal(dynamic_map(), bnbf.create_dynamic_map())
    for scale in (1e-4, 1.0, 1e3):
        x = torch.randn(70001) * scale
        x[256:512] = 0
        codes, absmax, _ = quantize_dynamic(x, 256)
        theirs, state = bnbf.quantize_blockwise(x, blocksize=256)
        assert torch.equal(absmax, state.absmax)
        assert torch.equal(codes, theirs)


def test_bitsandbytes_reads_our_state_dict() -> None:
    import bitsandbytes.functional as bnbf

    for kind in ("nf4", "fp4"):
        ours = quantize(torch.randn(40, 24), kind, 64, double_quant=True)
        tensors = ours.to_state_dict("weight")
        qs = {k.removeprefix("weight."): v for k, v in tensors.items() if k != "weight"}
        theirs = bnbf.QuantState.from_dict(qs, device=torch.device("cpu"))
        values = bnbf.dequantize_4bit(tensors["weight"], theirs)
        assert torch.equal(values, dequantize(ours))
        back = QuantState.from_state_dict(tensors, "weight")
        assert torch.equal(dequantize(back), dequantize(ours))
