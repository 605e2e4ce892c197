"""The fused dequantize + matmul Triton kernel against ``x @ dequantize_reference(W).T``.

On a CUDA machine the kernel runs on the GPU; without one, on the CPU under Triton's
interpreter (``TRITON_INTERPRET=1``, set in conftest). The interpreter is slow, so shapes are
small; they are chosen to hit every path: blocks spanning two rows (K % blocksize != 0), a
single short block, rows starting mid-byte (K · bits % 8 != 0), one scale per tile row
(K % blocksize == 0), several M and N tiles, and split-K.
"""

from __future__ import annotations

import statistics

import pytest
import torch

from qlora.quant import KINDS, QuantState, dequantize, dequantize_reference, quantize
from qlora.quant.blockwise import dequantize_absmax

from ..conftest import requires_cuda, requires_triton

pytestmark = requires_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# ((N, K), blocksize)
SHAPES = [
    ((70, 300), 64),  # blocks span rows, partial N and K tiles
    ((20, 128), 4096),  # one short block for the whole weight
    ((40, 256), 128),  # K % blocksize == 0: one scale per tile row
    ((9, 301), 32),  # odd K: rows start mid-byte for 2- and 4-bit codes
]


def _state(
    shape: tuple[int, int], kind: str, blocksize: int, double_quant: bool = False
) -> QuantState:
    return quantize(torch.randn(shape) * 0.05, kind, blocksize, double_quant=double_quant).to(
        DEVICE
    )


def _fused(x: torch.Tensor, state: QuantState, **kwargs: int) -> torch.Tensor:
    from qlora.kernels.triton_matmul import quantized_matmul_triton

    n, k = state.shape
    return quantized_matmul_triton(
        x,
        state.packed,
        dequantize_absmax(state).contiguous(),
        state.code,
        n,
        k,
        state.blocksize,
        state.bits,
        **kwargs,
    )


def _reference(x: torch.Tensor, state: QuantState) -> torch.Tensor:
    return x.float() @ dequantize_reference(state, torch.float32).T


def _assert_matches(out: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Tolerances relative to the output's scale: fp32 tight; bf16/fp16 a few output ulps
    (the weight tile is rounded to the input dtype, as dequantize-then-matmul does)."""
    assert out.dtype == dtype
    assert out.shape == expected.shape
    scale = expected.abs().max().item()
    rtol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(out.float(), expected, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize(("shape", "blocksize"), SHAPES)
def test_fp32_matches_reference(kind: str, m: int, shape: tuple[int, int], blocksize: int) -> None:
    state = _state(shape, kind, blocksize)
    x = torch.randn(m, shape[1], device=DEVICE)
    _assert_matches(_fused(x, state), _reference(x, state), torch.float32)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize(("shape", "blocksize"), [SHAPES[0], SHAPES[3]])
def test_half_inputs_match_reference(
    kind: str, dtype: torch.dtype, m: int, shape: tuple[int, int], blocksize: int
) -> None:
    state = _state(shape, kind, blocksize)
    x = torch.randn(m, shape[1], device=DEVICE).to(dtype)
    _assert_matches(_fused(x, state), _reference(x, state), dtype)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_double_quantized_state(kind: str) -> None:
    state = _state((70, 300), kind, 64, double_quant=True)
    assert state.nested is not None
    x = torch.randn(3, 300, device=DEVICE)
    _assert_matches(_fused(x, state), _reference(x, state), torch.float32)


@pytest.mark.parametrize("split_k", [2, 3, 100])
def test_split_k_matches_single_pass(split_k: int) -> None:
    state = _state((70, 300), "nf4", 64)
    x = torch.randn(5, 300, device=DEVICE)
    single = _fused(x, state, split_k=1, block_k=32)
    split = _fused(x, state, split_k=split_k, block_k=32)
    _assert_matches(split, single, torch.float32)
    half = _fused(x.bfloat16(), state, split_k=split_k, block_k=32)
    _assert_matches(half, _reference(x.bfloat16(), state), torch.bfloat16)


@pytest.mark.parametrize(("block_n", "block_k"), [(16, 16), (64, 64), (32, 256)])
def test_tile_sizes(block_n: int, block_k: int) -> None:
    """Different tiles switch between per-row and per-element scales; results agree."""
    for shape, blocksize in (((40, 256), 128), ((9, 301), 32)):
        state = _state(shape, "nf4", blocksize)
        x = torch.randn(2, shape[1], device=DEVICE)
        out = _fused(x, state, block_n=block_n, block_k=block_k)
        _assert_matches(out, _reference(x, state), torch.float32)


def test_more_rows_than_one_tile() -> None:
    """Correct (if not fast) beyond FUSED_MAX_TOKENS: M spans two BLOCK_M tiles."""
    from qlora.kernels.triton_matmul import FUSED_MAX_TOKENS

    state = _state((20, 128), "fp4", 64)
    x = torch.randn(FUSED_MAX_TOKENS + 4, 128, device=DEVICE)
    _assert_matches(_fused(x, state), _reference(x, state), torch.float32)


def test_empty_input() -> None:
    state = _state((20, 128), "nf4", 64)
    out = _fused(torch.randn(0, 128, device=DEVICE), state)
    assert out.shape == (0, 20)


def test_rejects_bad_arguments() -> None:
    from qlora.kernels.triton_matmul import quantized_matmul_triton

    state = _state((20, 128), "nf4", 64, double_quant=True)
    absmax = dequantize_absmax(state)
    x = torch.randn(2, 128, device=DEVICE)
    with pytest.raises(ValueError, match="absmax must be float32"):  # nested uint8 codes
        quantized_matmul_triton(x, state.packed, state.absmax, state.code, 20, 128, 64, 4)
    with pytest.raises(ValueError, match="x must be"):
        quantized_matmul_triton(x[:, :100], state.packed, absmax, state.code, 20, 128, 64, 4)
    with pytest.raises(ValueError, match="packed has"):
        quantized_matmul_triton(x, state.packed, absmax, state.code, 21, 128, 64, 4)
    with pytest.raises(ValueError, match="bits"):
        quantized_matmul_triton(x, state.packed, absmax, state.code, 20, 128, 64, 3)
    with pytest.raises(TypeError, match="float32, bfloat16"):
        quantized_matmul_triton(x.double(), state.packed, absmax, state.code, 20, 128, 64, 4)


def _median_ms(fn, repeats: int = 50) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 4, 16])
def test_cuda_fused_agrees_with_and_beats_dequantize_matmul(m: int) -> None:
    state = quantize(torch.randn(4096, 4096) * 0.02, "nf4", 64).to("cuda")
    x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
    fused = _fused(x, state)
    unfused = x @ dequantize(state, torch.bfloat16).T
    _assert_matches(fused, _reference(x, state), torch.bfloat16)
    _assert_matches(fused, unfused.float(), torch.bfloat16)
    fused_ms = _median_ms(lambda: _fused(x, state))
    unfused_ms = _median_ms(lambda: x @ dequantize(state, torch.bfloat16).T)
    print(f"M={m}: fused {fused_ms:.4f} ms, dequantize+matmul {unfused_ms:.4f} ms")
    assert fused_ms < unfused_ms


@requires_cuda
@pytest.mark.gpu
def test_quantlinear_decodes_with_the_fused_kernel_on_cuda() -> None:
    from qlora.nn import QuantLinear

    linear = torch.nn.Linear(4096, 1024, bias=True)
    layer = QuantLinear.from_linear(linear, "nf4", compute_dtype=torch.bfloat16).to("cuda")
    x = torch.randn(1, 3, 4096, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        fused = layer(x)
    reference = x @ layer.dequantized_weight(torch.bfloat16).t() + layer.bias.to(x.dtype)
    torch.testing.assert_close(fused, reference, rtol=2e-2, atol=2e-2)


def test_quantlinear_fused_decode_helper_matches_forward() -> None:
    """The QuantLinear decode path (run here by the interpreter) equals its regular forward."""
    from qlora.nn import QuantLinear
    from qlora.nn.qlinear import _fused_decode

    device = "cuda" if torch.cuda.is_available() else "cpu"
    layer = QuantLinear.from_linear(torch.nn.Linear(128, 48), "nf4").to(device)
    x = torch.randn(2, 1, 128, device=device)
    with torch.no_grad():
        want = layer(x) - layer.bias
        got = _fused_decode(x, layer.quant_state)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
