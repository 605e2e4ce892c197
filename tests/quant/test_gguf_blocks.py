"""GGUF block dequantize: reference == C kernel == the gguf package's numpy, bit for bit."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from qlora.kernels import c_extension
from qlora.quant import gguf_blocks as gb
from qlora.quant.gguf_blocks import (
    F16_SCALE_OFFSETS,
    GGUF_BLOCK_KINDS,
    bits_per_weight,
    block_shape,
    dequantize_blocks,
    dequantize_blocks_reference,
    ggml_type,
    gguf_kind,
    row_bytes,
)

from ..conftest import requires_cuda

needs_kernel = pytest.mark.skipif(c_extension("gguf") is None, reason="C kernel not built")

HALF_DTYPES = (torch.bfloat16, torch.float16)


def random_blocks(
    kind: str, rows: int, columns: int, seed: int = 0, exponents: tuple[int, int] = (-14, 15)
) -> np.ndarray:
    """Random bytes [rows, row_bytes] whose float16 scales are finite, with 2^exponents range
    (the default: normal float16 values only)."""
    rng = np.random.default_rng(seed)
    elements, nbytes = block_shape(kind)
    nblocks = rows * columns // elements
    raw = rng.integers(0, 256, (nblocks, nbytes), dtype=np.uint8)
    for offset in F16_SCALE_OFFSETS[kind]:
        magnitude = np.exp2(rng.uniform(*exponents, nblocks)) * rng.choice([-1, 1], nblocks)
        scale = magnitude.astype(np.float16)
        assert np.isfinite(scale).all()
        raw[:, offset : offset + 2] = scale.view(np.uint8).reshape(nblocks, 2)
    return raw.reshape(rows, row_bytes(kind, columns))


def quantized_blocks(kind: str, rows: int, columns: int, seed: int = 0) -> np.ndarray | None:
    """gguf's own quantization of random data, or None where gguf has no quantizer."""
    x = np.random.default_rng(seed).standard_normal((rows, columns)).astype(np.float32)
    try:
        return gguf.quants.quantize(x, ggml_type(kind))
    except NotImplementedError:
        return None


def peer(raw: np.ndarray, kind: str) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(raw, ggml_type(kind)).copy())


def test_kind_table_matches_gguf() -> None:
    assert {"q4_0", "q4_1", "q8_0", "q4_k", "q6_k"} <= set(GGUF_BLOCK_KINDS)
    for kind in GGUF_BLOCK_KINDS:
        qtype = ggml_type(kind)
        assert qtype.name.lower() == kind and gguf_kind(qtype) == kind
        assert gguf_kind(int(qtype)) == kind
        assert block_shape(kind) == gguf.GGML_QUANT_SIZES[qtype]
        elements, nbytes = block_shape(kind)
        assert row_bytes(kind, 3 * elements) == 3 * nbytes
    assert bits_per_weight("q4_1") == 5.0 and bits_per_weight("q8_0") == 8.5
    assert bits_per_weight("q6_k") == 6.5625
    assert gguf_kind(gguf.GGMLQuantizationType.F32) is None
    assert gguf_kind(gguf.GGMLQuantizationType.IQ2_XXS) is None


# gguf quantizes the legacy kinds only; random blocks (valid scales) cover every kind
CASES = [(kind, "random") for kind in GGUF_BLOCK_KINDS] + [
    (kind, "quantized") for kind in GGUF_BLOCK_KINDS if quantized_blocks(kind, 1, 256) is not None
]


@pytest.mark.parametrize(("kind", "source"), CASES)
@pytest.mark.parametrize("rows_columns", [(5, 512), (1, 256), (96, 2048)])
def test_reference_and_kernel_match_gguf(
    kind: str, source: str, rows_columns: tuple[int, int]
) -> None:
    rows, columns = rows_columns
    if source == "random":
        raw = random_blocks(kind, rows, columns, seed=rows)
    else:
        raw = quantized_blocks(kind, rows, columns, seed=rows)
        assert raw is not None
    expected = peer(raw, kind)  # [rows, columns] float32
    assert not expected.isnan().any()
    blocks = torch.from_numpy(raw)
    reference = dequantize_blocks_reference(blocks, kind, (rows, columns))
    fast = dequantize_blocks(blocks, kind, (rows, columns))
    assert reference.dtype == fast.dtype == torch.float32
    assert torch.equal(reference, expected)
    assert torch.equal(fast, expected)
    for dtype in HALF_DTYPES:
        rounded = expected.to(dtype)
        assert torch.equal(
            dequantize_blocks_reference(blocks, kind, (rows, columns), dtype), rounded
        )
        assert torch.equal(dequantize_blocks(blocks, kind, (rows, columns), dtype), rounded)


@pytest.mark.parametrize("kind", ["q4_1", "q8_0", "q3_k", "q6_k"])
def test_subnormal_and_huge_scales(kind: str) -> None:
    # float16 subnormal scales (2^-24 ...) and scales near float16's max: outputs that are
    # float16 subnormals, zeros and infinities after rounding
    for exponents in ((-24, -13), (12, 15.99)):
        raw = random_blocks(kind, 3, 256, seed=7, exponents=exponents)
        expected = peer(raw, kind)
        blocks = torch.from_numpy(raw)
        assert torch.equal(dequantize_blocks(blocks, kind, (3, 256)), expected)
        for dtype in HALF_DTYPES:
            assert torch.equal(dequantize_blocks(blocks, kind, (3, 256), dtype), expected.to(dtype))


def test_shapes_and_flat_blocks() -> None:
    raw = random_blocks("q4_k", 6, 512)
    expected = peer(raw, "q4_k")
    flat = torch.from_numpy(raw).reshape(-1)
    assert torch.equal(dequantize_blocks(flat, "q4_k", (2, 3, 512)), expected.view(2, 3, 512))
    assert torch.equal(dequantize_blocks(flat, "q4_k", (3072,)), expected.view(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_out_is_reused(dtype: torch.dtype) -> None:
    out = torch.empty(4 * 1024, dtype=dtype)
    for seed in (1, 2):
        raw = random_blocks("q5_k", 4, 1024, seed=seed)
        result = dequantize_blocks(torch.from_numpy(raw), "q5_k", (4, 1024), dtype, out=out)
        assert result.data_ptr() == out.data_ptr() and result.shape == (4, 1024)
        assert torch.equal(result, peer(raw, "q5_k").to(dtype))
    same_shape = torch.empty(4, 1024, dtype=dtype)
    assert dequantize_blocks(torch.from_numpy(raw), "q5_k", (4, 1024), dtype, out=same_shape) is (
        same_shape
    )


def test_bad_out_is_refused() -> None:
    blocks = torch.from_numpy(random_blocks("q8_0", 2, 64))
    bad = [
        torch.empty(2, 64, dtype=torch.bfloat16),  # wrong dtype
        torch.empty(2, 65),  # wrong size
        torch.empty(64, 2).t(),  # not contiguous
    ]
    for out in bad:
        with pytest.raises(ValueError, match="out must be a contiguous"):
            dequantize_blocks(blocks, "q8_0", (2, 64), out=out)


def test_bad_input_is_refused() -> None:
    blocks = torch.from_numpy(random_blocks("q4_0", 2, 64))  # 2 rows of 2 blocks of 18 bytes
    with pytest.raises(ValueError, match=r"must be 72 bytes .* got 54"):
        dequantize_blocks(blocks.reshape(-1)[:54], "q4_0", (2, 64))
    with pytest.raises(ValueError, match="must be 36 bytes"):
        dequantize_blocks_reference(blocks, "q4_0", (1, 64))
    with pytest.raises(ValueError, match="unknown GGUF block kind 'q4_2'"):
        dequantize_blocks(blocks, "q4_2", (2, 64))
    with pytest.raises(ValueError, match="unknown GGUF block kind"):
        row_bytes("nf4", 64)
    with pytest.raises(ValueError, match="float64; expected float32, bfloat16 or float16"):
        dequantize_blocks(blocks, "q4_0", (2, 64), torch.float64)
    with pytest.raises(ValueError, match=r"70 columns .* multiple of 32"):
        dequantize_blocks(blocks, "q4_0", (2, 70))
    with pytest.raises(ValueError, match="contiguous uint8"):
        dequantize_blocks(blocks.to(torch.int8), "q4_0", (2, 64))
    with pytest.raises(ValueError, match="not a tensor shape"):
        dequantize_blocks(blocks, "q4_0", ())


@needs_kernel
def test_disabled_kernels_take_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = random_blocks("q6_k", 2, 512)
    calls: list[str] = []

    def spy(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append("reference")
        return dequantize_blocks_reference(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(gb, "dequantize_blocks_reference", spy)
    fast = dequantize_blocks(torch.from_numpy(raw), "q6_k", (2, 512))
    assert calls == []
    monkeypatch.setenv("QLORA_DISABLE_KERNELS", "1")
    slow = dequantize_blocks(torch.from_numpy(raw), "q6_k", (2, 512))
    assert calls == ["reference"]
    assert torch.equal(fast, slow) and torch.equal(slow, peer(raw, "q6_k"))


def test_default_model_gguf_tensors() -> None:
    from qlora.models.registry import registered_path

    path = registered_path("smollm2-135m")
    if path is None or not path.exists():
        pytest.skip("the default model's GGUF is not installed")
    reader = gguf.GGUFReader(path)
    checked: set[str] = set()
    for tensor in reader.tensors:
        kind = gguf_kind(tensor.tensor_type)
        if kind is None or kind in checked:
            continue
        raw = np.asarray(tensor.data)[:512]  # [rows, row_bytes]: at most 512 rows
        rows = raw.shape[0]
        columns = int(tensor.shape[0])  # ggml's shape lists the row length first
        expected = peer(raw, kind)
        got = dequantize_blocks(torch.from_numpy(raw.copy()), kind, (rows, columns))
        assert torch.equal(got, expected), tensor.name
        checked.add(kind)
    assert {"q4_1", "q8_0"} <= checked


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("kind", GGUF_BLOCK_KINDS)
def test_reference_on_cuda_matches_gguf(kind: str) -> None:
    raw = random_blocks(kind, 64, 1024, seed=3)
    expected = peer(raw, kind)
    blocks = torch.from_numpy(raw).cuda()
    assert torch.equal(dequantize_blocks(blocks, kind, (64, 1024)).cpu(), expected)
    for dtype in HALF_DTYPES:
        got = dequantize_blocks_reference(blocks, kind, (64, 1024), dtype).cpu()
        assert torch.equal(got, expected.to(dtype))
