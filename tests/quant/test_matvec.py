"""The fused few-row kernel (qlora/kernels/matvec.c) against x @ dequantize(state)ᵀ.

Tolerance: the row-buffer kernels form every weight exactly as the reference does (code *
absmax, one float32 product; double-quantized scales decoded with the reference's two
roundings), so the only difference is the float32 summation order of each dot product. The
AVX-512 4-bit kernel for up to 4 rows multiplies each block scale onto a partial sum of 8
code * x products instead (s * sum c x for sum s * c * x: other roundings, the same bound). We
assert, element-wise, ``|ours - reference| <= MATVEC_RTOL * (|x| @ |W|ᵀ)`` with MATVEC_RTOL =
1e-5 (the observed worst case is ~2e-7 for in = 512; a reordered float32 sum of n terms is
bounded by about n * 2^-24 times that quantity, and the deferred scale adds one rounding per
8 terms; measured against a float64 sum, both kernels' worst error is ~3e-8 of that scale,
torch's own float32 matmul's ~1e-7).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from qlora.kernels import c_extension
from qlora.quant import dequantize, quantize
from qlora.quant.blockwise import dequantize_absmax
from qlora.quant.matvec import (
    MATVEC_MAX_ROWS,
    MATVEC_RTOL,
    matvec_applies,
    quantized_matmul_few,
)

KERNEL = c_extension("matvec")
needs_kernel = pytest.mark.skipif(KERNEL is None, reason="qlora.kernels._matvec is not built")
OUT, IN = 37, 512  # 37 output rows: odd, not a multiple of the thread count or of a row pair


def _reference(x: torch.Tensor, state) -> torch.Tensor:
    return x.float() @ dequantize(state, torch.float32).t()


def _assert_close(ours: torch.Tensor, x: torch.Tensor, state) -> None:
    weight = dequantize(state, torch.float32)  # [out, in]
    reference = x.float() @ weight.t()
    bound = MATVEC_RTOL * (x.float().abs() @ weight.abs().t())
    assert ours.dtype == torch.float32 and ours.shape == reference.shape
    excess = (ours - reference).abs() - bound
    assert bool((excess <= 0).all()), f"max excess over the bound {excess.max().item():.3g}"


@needs_kernel
@pytest.mark.parametrize(
    ("kind", "double_quant", "blocksize", "rows"),
    list(itertools.product(["nf4", "fp4", "nf2", "int8"], [False, True], [64, 128, 256],
                           [1, 2, 5, 16])),
)  # fmt: skip
def test_kernel_matches_reference(kind: str, double_quant: bool, blocksize: int, rows: int) -> None:
    torch.manual_seed(rows + blocksize)
    state = quantize(torch.randn(OUT, IN), kind, blocksize, double_quant)
    x = torch.randn(rows, IN)
    assert matvec_applies(x, state)
    _assert_close(quantized_matmul_few(x, state), x, state)


def _kernel(
    x: torch.Tensor, state, path: int = -1, absmax: torch.Tensor | None = None
) -> torch.Tensor:
    """The raw kernel: the double-quantized scales decoded inside it unless ``absmax`` (fp32
    scales) is given; ``path`` -1 best, 0 scalar, 1 avx2, 2 avx512."""
    m, (out, inp) = x.shape[0], state.shape
    y = torch.empty(m, out)
    nested = state.nested if absmax is None else None
    args = [
        x.data_ptr(), state.packed.data_ptr(),
        0 if nested else (state.absmax if absmax is None else absmax).data_ptr(),
        state.code.data_ptr(), y.data_ptr(), m, out, inp, state.blocksize, state.bits, 2, path,
    ]  # fmt: skip
    if nested is not None:  # scales decoded in the kernel
        args += [state.absmax.data_ptr(), nested.code.data_ptr(), nested.absmax.data_ptr()]
        args += [float(nested.offset), nested.blocksize]
    KERNEL.matmul(*args)
    return y


@needs_kernel
@pytest.mark.parametrize(
    ("kind", "double_quant"), list(itertools.product(["nf4", "fp4", "nf2", "int8"], [False, True]))
)
def test_every_cpu_path_matches_reference(kind: str, double_quant: bool) -> None:
    """The scalar and AVX2 paths too, not only the one this CPU picks (path <= the best); 3
    rows take AVX-512's register-decoding 4-bit kernel, 5 its row-buffer one."""
    torch.manual_seed(1)
    state = quantize(torch.randn(OUT, IN), kind, 32, double_quant)
    best = ["scalar", "avx2", "avx512"].index(KERNEL.best_path())
    for rows in (3, 5):
        x = torch.randn(rows, IN)
        for path in range(best + 1):
            _assert_close(_kernel(x, state, path), x, state)


@needs_kernel
@pytest.mark.parametrize(
    ("kind", "inp", "blocksize"),
    [
        ("nf4", 160, 32),  # in % 128 == 32: the last 128-column chunk has 4 of 16 lanes
        ("nf4", 576, 64),  # the default model's width: a half chunk at the end
        ("fp4", 224, 32),  # 96 columns in the last chunk
        ("nf4", 384, 128),
        ("fp4", 512, 256),  # a block spans two chunks
        ("nf4", 4096, 4096),
    ],
)
@pytest.mark.parametrize("double_quant", [False, True])
def test_4bit_widths_and_row_counts(
    kind: str, inp: int, blocksize: int, double_quant: bool
) -> None:
    """Every row count of the 4-bit kernels (1-4: registers; 5: row buffer) on widths that are
    not whole 128-column chunks, with an output count that is not a multiple of 4."""
    torch.manual_seed(inp + blocksize)
    state = quantize(torch.randn(OUT, inp), kind, blocksize, double_quant)
    for rows in (1, 2, 3, 4, 5):
        x = torch.randn(rows, inp)
        _assert_close(quantized_matmul_few(x, state), x, state)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 3, 5])
def test_double_quant_scales_in_the_kernel_are_exact(rows: int) -> None:
    """Scales decoded in the kernel (two roundings, as blockwise.dequantize_absmax) give the
    same bits as the kernel fed dequantize_absmax's float32 scales."""
    torch.manual_seed(5)
    state = quantize(torch.randn(OUT, IN), "nf4", 64, True)
    x = torch.randn(rows, IN)
    absmax = dequantize_absmax(state).float().contiguous()
    assert torch.equal(_kernel(x, state), _kernel(x, state, absmax=absmax))


@needs_kernel
def test_nonfinite_input_propagates_like_the_reference() -> None:
    """An inf or NaN in x spreads to every output, as in the reference (no lane of the padded
    chunk may hide or invent one)."""
    state = quantize(torch.randn(OUT, 576), "nf4", 64, True)
    for bad in (float("inf"), float("nan")):
        x = torch.randn(1, 576)
        x[0, 570] = bad
        ours, reference = quantized_matmul_few(x, state), _reference(x, state)
        assert torch.equal(ours.isnan(), reference.isnan())
        assert torch.equal(ours.isinf(), reference.isinf())


@needs_kernel
def test_int8_with_another_codebook_takes_the_gather_path() -> None:
    from dataclasses import replace

    torch.manual_seed(2)
    state = quantize(torch.randn(OUT, IN), "int8", 64, True)
    state = replace(state, code=state.code * 0.75)  # not (i - 128) / 127 any more
    x = torch.randn(3, IN)
    _assert_close(quantized_matmul_few(x, state), x, state)


@needs_kernel
def test_leading_dims_bf16_input_and_empty() -> None:
    torch.manual_seed(3)
    state = quantize(torch.randn(OUT, IN), "nf4", 64, True)
    x = torch.randn(2, 3, IN, dtype=torch.bfloat16)
    ours = quantized_matmul_few(x, state)
    assert ours.shape == (2, 3, OUT)
    _assert_close(ours.view(6, OUT), x.view(6, IN), state)
    assert quantized_matmul_few(torch.empty(0, IN), state).shape == (0, OUT)


@needs_kernel
def test_a_wider_weight_after_a_narrow_one() -> None:
    """The per-thread row buffer grows (in = 512, then 4096 with out % 4 == 3)."""
    torch.manual_seed(4)
    for out, inp in ((OUT, IN), (7, 4096)):
        state = quantize(torch.randn(out, inp), "nf4", 64, True)
        x = torch.randn(3, inp)
        _assert_close(quantized_matmul_few(x, state), x, state)


def test_a_state_the_kernel_cannot_trust_gives_the_reference() -> None:
    from dataclasses import replace

    state = quantize(torch.randn(OUT, IN), "nf4", 64, False)
    short = replace(state, code=state.code[:8])  # 8 codes for 4-bit indices: would read past
    x = torch.randn(1, IN)
    assert not matvec_applies(x, short)
    assert not matvec_applies(x, replace(state, absmax=state.absmax[:-1]))


def test_kernels_disabled_gives_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QLORA_DISABLE_KERNELS", "1")
    state = quantize(torch.randn(OUT, IN), "nf4", 64, True)
    x = torch.randn(2, IN)
    assert not matvec_applies(x, state)
    assert torch.equal(quantized_matmul_few(x, state), _reference(x, state))


def test_ineligible_inputs_give_the_reference() -> None:
    many = torch.randn(MATVEC_MAX_ROWS + 1, IN)
    state = quantize(torch.randn(OUT, IN), "nf4", 64, False)
    assert not matvec_applies(many, state)
    assert torch.equal(quantized_matmul_few(many, state), _reference(many, state))
    ragged = quantize(torch.randn(OUT, 96), "nf4", 64, False)  # a row is 1.5 blocks
    x = torch.randn(1, 96)
    assert not matvec_applies(x, ragged)
    assert torch.equal(quantized_matmul_few(x, ragged), _reference(x, ragged))


def test_input_that_needs_grad_keeps_its_graph() -> None:
    state = quantize(torch.randn(OUT, IN), "nf4", 64, False)
    x = torch.randn(2, IN, requires_grad=True)
    assert not matvec_applies(x, state)
    quantized_matmul_few(x, state).sum().backward()
    assert x.grad is not None and x.grad.shape == (2, IN)
    with torch.no_grad():
        assert matvec_applies(x, state) == (KERNEL is not None)


def test_wrong_shapes_are_one_line_errors() -> None:
    state = quantize(torch.randn(OUT, IN), "nf4", 64, False)
    with pytest.raises(ValueError, match=r"x has 100 features .* expects 512") as err:
        quantized_matmul_few(torch.randn(2, 100), state)
    assert "\n" not in str(err.value)
    flat = quantize(torch.randn(IN), "nf4", 64, False)
    with pytest.raises(ValueError, match=r"2-D \[out, in\] weight; the state has shape \(512,\)"):
        quantized_matmul_few(torch.randn(1, IN), flat)
    with pytest.raises(ValueError, match=r"must be float32, bfloat16 or float16, got torch\.int64"):
        quantized_matmul_few(torch.ones(1, IN, dtype=torch.long), state)


@needs_kernel
def test_integer_codes_on_every_cpu_path() -> None:
    """Codes i - 128 (quant/lossless.py's exact 8-bit blocks): decoded without a gather on
    AVX2/AVX-512, bit for bit the table's values, on every path."""
    from qlora.quant.lossless import lossless_int8

    torch.manual_seed(2)
    scales = (torch.rand(OUT, IN // 32, 1) + 0.5).half().float()  # float16 scales, as Q8_0
    codes = torch.randint(-127, 128, (OUT, IN // 32, 32)).float()
    codes[..., 0] = 127  # as Q8_0 blocks: the largest |code| is 127
    state = lossless_int8((codes * scales).reshape(OUT, IN))
    assert state is not None
    best = ["scalar", "avx2", "avx512"].index(KERNEL.best_path())
    for rows in (1, 5):
        x = torch.randn(rows, IN)
        for path in range(best + 1):
            _assert_close(_kernel(x, state, path), x, state)
