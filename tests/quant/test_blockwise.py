"""The reference quantizer: round trips, error bounds, packing, errors on bad input."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qlora.quant import BLOCKSIZES, KINDS, QuantState, dequantize_reference, quantize
from qlora.quant.blockwise import dequantize_absmax, pack_codes, unpack_codes
from qlora.quant.codebooks import codebook


def widest_half_gap(kind: str) -> float:
    table = codebook(kind).sort().values
    return float((table[1:] - table[:-1]).max()) / 2


def block_view(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    flat = x.reshape(-1).float()
    return torch.nn.functional.pad(flat, (0, -flat.numel() % blocksize)).view(-1, blocksize)


@settings(max_examples=60, deadline=None)
@given(
    kind=st.sampled_from(KINDS),
    rows=st.integers(1, 40),
    cols=st.integers(1, 97),
    blocksize=st.sampled_from([32, 64, 256]),
    scale=st.floats(1e-4, 1e3),
    double_quant=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_error_bound(
    kind: str, rows: int, cols: int, blocksize: int, scale: float, double_quant: bool, seed: int
) -> None:
    """|x - deq(q(x))| <= half the widest code gap x absmax (+ the absmax error with DQ)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=gen) * scale
    state = quantize(x, kind, blocksize, double_quant)
    y = dequantize_reference(state)
    assert y.shape == x.shape and y.dtype == x.dtype
    true_absmax = block_view(x, blocksize).abs().amax(dim=1)
    used_absmax = dequantize_absmax(state)
    bound = widest_half_gap(kind) * true_absmax + (used_absmax - true_absmax).abs()
    err = block_view(x - y, blocksize).abs()
    assert torch.all(err <= bound[:, None] * (1 + 1e-5) + 1e-30)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtype_and_shape_round_trip(kind: str, dtype: torch.dtype) -> None:
    x = (torch.randn(3, 5, 7) * 0.1).to(dtype)
    y = dequantize_reference(quantize(x, kind, 32))
    assert y.dtype == dtype and y.shape == x.shape
    rel = (x.float() - y.float()).norm() / x.float().norm()
    assert rel < {"int8": 0.02, "nf4": 0.15, "fp4": 0.2, "nf2": 0.6}[kind]


def test_codebook_values_and_zero_round_trip_exactly() -> None:
    for kind in KINDS:
        table = codebook(kind)
        table = table[table.abs() <= 1]  # int8's code -128/127 is never chosen
        x = torch.cat([table * 3.0, torch.zeros(5)])  # one (short) block of 4096
        y = dequantize_reference(quantize(x, kind, 4096, double_quant=False))
        torch.testing.assert_close(y[: table.numel()], table * 3.0, atol=1e-6, rtol=1e-6)
        assert torch.all(y[table.numel() :] == 0)


def test_all_zero_tensor() -> None:
    x = torch.zeros(100)
    for kind in KINDS:
        assert torch.all(dequantize_reference(quantize(x, kind, 32)) == 0)


def test_pack_unpack_order_first_element_in_high_bits() -> None:
    codes = torch.tensor([1, 2, 3, 4], dtype=torch.uint8)
    assert pack_codes(codes, 4).tolist() == [0x12, 0x34]
    assert pack_codes(codes, 2).tolist() == [0b01_10_11_00]
    for bits in (2, 4, 8):
        values = torch.randint(0, 2**bits, (64,), dtype=torch.uint8)
        assert torch.equal(unpack_codes(pack_codes(values, bits), bits, 64), values.long())


@pytest.mark.parametrize(("kind", "n", "nbytes"), [("nf4", 7, 4), ("nf2", 7, 2), ("int8", 7, 7)])
def test_odd_sizes_are_padded(kind: str, n: int, nbytes: int) -> None:
    state = quantize(torch.randn(n), kind, 32)
    assert state.packed.numel() == nbytes
    assert dequantize_reference(state).shape == (n,)


def test_nf4_double_quant_bits_per_parameter() -> None:
    state = quantize(torch.randn(4096, 4096), "nf4", 64, double_quant=True)
    bits = state.bits_per_parameter()
    assert 4.12 < bits <= 4.13  # 4 + 8/64 + 32/(64*256) + codebooks
    plain = quantize(torch.randn(4096, 4096), "nf4", 64, double_quant=False)
    assert math.isclose(plain.bits_per_parameter(), 4.5, abs_tol=1e-3)


@pytest.mark.parametrize(
    ("tensor", "kind", "blocksize", "error", "match"),
    [
        (torch.empty(0), "nf4", 64, ValueError, "empty"),
        (torch.ones(4, dtype=torch.int32), "nf4", 64, TypeError, "float32, float16 and bfloat16"),
        (torch.ones(4), "nf4", 48, ValueError, "unsupported blocksize 48"),
        (torch.ones(4), "nf3", 64, ValueError, "unknown quantization kind 'nf3'"),
        (torch.tensor([1.0, float("nan")]), "nf4", 64, ValueError, "NaN or inf"),
        (torch.tensor([1.0, float("inf")]), "fp4", 64, ValueError, "NaN or inf"),
    ],
)
def test_bad_input_errors(
    tensor: torch.Tensor, kind: str, blocksize: int, error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        quantize(tensor, kind, blocksize)


def test_state_dict_round_trip_for_all_kinds() -> None:
    for kind in KINDS:
        for double_quant in (False, True):
            state = quantize(torch.randn(33, 65), kind, 64, double_quant)
            tensors = state.to_state_dict("w")
            back = QuantState.from_state_dict(tensors, "w")
            assert torch.equal(dequantize_reference(back), dequantize_reference(state))
            assert back.kind == kind and back.shape == state.shape


def test_from_state_dict_errors_name_the_problem() -> None:
    tensors = quantize(torch.randn(8, 8), "nf4", 64).to_state_dict("layer.weight")
    broken = {k: v for k, v in tensors.items() if "quant_state" not in k}
    with pytest.raises(KeyError, match=r"layer\.weight\.quant_state"):
        QuantState.from_state_dict(broken, "layer.weight")
    short = dict(tensors)
    short["layer.weight"] = short["layer.weight"][:5]
    with pytest.raises(ValueError, match="packed weight has 5 bytes"):
        QuantState.from_state_dict(short, "layer.weight")


def test_blocksizes_constant() -> None:
    assert BLOCKSIZES == (32, 64, 128, 256, 512, 1024, 2048, 4096)
