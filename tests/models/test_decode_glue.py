"""The C glue of a decode step (qlora.models.decode_glue) against its torch reference: each op
alone (RMSNorm with the residual add, rotary + KV write + attention, SwiGLU, the adapters'
row updates), its argument checks, and BatchDecoder's steps with c_glue=True against
c_glue=False on tiny models (GQA, biases, Qwen3's q/k norms, rows of different lengths,
mixed adapters)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qlora.config import QuantConfig
from qlora.kernels import DISABLE_VARIABLE, c_extension
from qlora.models.batch_decode import BatchDecoder, _rope, _signed_sin, adapter_weights
from qlora.models.decode_glue import DecodeGlue, LayerShape
from qlora.models.lora_rows import (
    MAX_DESCRIBED_RANK,
    PreparedAdapter,
    add_site_update,
    prepare_adapter,
    site_table,
)
from qlora.nn.inject import quantize_model
from tests.tiny_models import tiny_causal_lm, tiny_llama, with_two_adapters

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(c_extension("decode") is None, reason="_decode not built")

VOCAB = 128


@pytest.fixture
def glue() -> DecodeGlue:
    made = DecodeGlue.create()
    assert made is not None
    return made


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) / max(float(b.abs().max()), 1e-30)


def _rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm.forward in float32."""
    variance = x.pow(2).mean(-1, keepdim=True)
    return weight * (x * torch.rsqrt(variance + eps))


@pytest.mark.parametrize("with_delta", [False, True])
def test_add_rms_norm_equals_the_residual_add_then_rmsnorm(
    glue: DecodeGlue, with_delta: bool
) -> None:
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 576, generator=generator) * 4
    delta = torch.randn(3, 576, generator=generator) if with_delta else None
    weight = torch.rand(576, generator=generator) + 0.5
    expected_hidden = hidden + delta if delta is not None else hidden.clone()
    expected = _rms_norm_reference(expected_hidden, weight, 1e-5)
    out = glue.add_rms_norm(hidden, delta, weight, 1e-5)
    assert torch.equal(hidden, expected_hidden)  # the add is one float32 rounding, in place
    assert _relative(out, expected) < 1e-6


def _attention_reference(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """BatchDecoder's torch path for one step: rotary, the cache write, a masked SDPA."""
    n, dim = cos.shape
    heads, kv_heads = queries.shape[1] // dim, keys.shape[1] // dim
    q = queries.view(n, heads, 1, dim)
    k = keys.view(n, kv_heads, 1, dim)
    v = values.view(n, kv_heads, 1, dim)
    cos4, sin4 = cos[:, None, None], _signed_sin(sin[:, None, None])
    q, k = _rope(q, cos4, sin4), _rope(k, cos4, sin4)
    rows = torch.arange(n)
    key_cache[rows, :, positions] = k[:, :, 0]
    value_cache[rows, :, positions] = v[:, :, 0]
    longest = int(positions.max()) + 1
    mask = (torch.arange(longest)[None] <= positions[:, None])[:, None, None]
    out = F.scaled_dot_product_attention(
        q, key_cache[:n, :, :longest], value_cache[:n, :, :longest], attn_mask=mask,
        scale=scale, enable_gqa=heads != kv_heads,
    )  # fmt: skip
    return out.reshape(n, heads * dim)


@pytest.mark.parametrize(
    ("heads", "kv_heads", "lengths"),
    [(9, 3, (0, 37, 5)), (4, 4, (12,)), (8, 2, (700, 3))],  # 700: beyond one score chunk
)
def test_attend_equals_rotary_cache_write_and_sdpa(
    glue: DecodeGlue, heads: int, kv_heads: int, lengths: tuple[int, ...]
) -> None:
    generator = torch.Generator().manual_seed(1)
    n, dim, capacity = len(lengths), 64, 1024
    queries = torch.randn(n, heads * dim, generator=generator)
    keys = torch.randn(n, kv_heads * dim, generator=generator)
    values = torch.randn(n, kv_heads * dim, generator=generator)
    caches = [torch.randn(n + 1, kv_heads, capacity, dim, generator=generator) for _ in range(2)]
    positions = torch.tensor(lengths, dtype=torch.long)
    angles = positions[:, None].float() * torch.rand(1, dim // 2, generator=generator)
    angles = torch.cat((angles, angles), dim=-1)  # [n, D] as transformers' rotary module
    cos, sin = angles.cos(), angles.sin()
    reference_caches = [c.clone() for c in caches]
    expected = _attention_reference(
        queries.clone(), keys.clone(), values.clone(), *reference_caches, positions, cos, sin, 0.125
    )
    out = glue.attend(queries, keys, values, *caches, positions, cos, sin, 0.125)
    assert _relative(out, expected) < 1e-5
    # The rotated key and the value land in each row's column, bit for bit (products rounded
    # before their sum, as torch); nothing else in the caches moved.
    assert torch.equal(caches[0], reference_caches[0])
    assert torch.equal(caches[1], reference_caches[1])


def test_swiglu_equals_silu_times_up(glue: DecodeGlue) -> None:
    generator = torch.Generator().manual_seed(2)
    gate = torch.randn(4, 1536, generator=generator) * 6
    gate[0, :6] = torch.tensor([0.0, -100.0, 100.0, 88.0, -88.0, 1e-20])  # exp's edges
    up = torch.randn(4, 1536, generator=generator)
    expected = F.silu(gate) * up
    out = glue.swiglu(gate, up)
    assert out is gate and bool(torch.isfinite(out).all())
    assert float(((out - expected).abs() / (expected.abs() + 1e-30)).max()) < 1e-6


def test_glue_checks_its_arguments(glue: DecodeGlue) -> None:
    hidden = torch.randn(2, 8)
    with pytest.raises(ValueError, match="float32"):
        glue.add_rms_norm(hidden.double(), None, torch.ones(8), 1e-5)
    with pytest.raises(ValueError, match="contiguous"):
        glue.add_rms_norm(torch.randn(8, 2).t(), None, torch.ones(8), 1e-5)
    with pytest.raises(ValueError, match="norm weight has 4 elements, expected 8"):
        glue.add_rms_norm(hidden, None, torch.ones(4), 1e-5)
    cache = torch.zeros(2, 1, 4, 8)
    row = (torch.randn(1, 8), torch.randn(1, 8), torch.randn(1, 8))
    trig = (torch.ones(1, 8), torch.zeros(1, 8))
    with pytest.raises(ValueError, match="outside the cache's 4 columns"):
        glue.attend(*row, cache, cache.clone(), torch.tensor([4]), *trig, 1.0)
    with pytest.raises(ValueError, match=r"positions must be torch\.int64"):
        glue.attend(*row, cache, cache.clone(), torch.tensor([1], dtype=torch.int32), *trig, 1.0)
    with pytest.raises(ValueError, match="up has 3 elements"):
        glue.swiglu(torch.randn(4), torch.randn(3))


def _ids(length: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (length,), generator=generator).tolist()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_steps_with_c_glue_equal_the_torch_path(arch: str) -> None:
    """Rows of different lengths and adapters (none, a, b, a), joining and leaving: every
    step's logits of the C glue equal the torch path's to float32 summation order."""
    model = {
        "llama": lambda: tiny_llama(seed=0, vocab=VOCAB),
        "qwen2": lambda: tiny_causal_lm("Qwen2", vocab=VOCAB),  # biases on q, k, v
        "qwen3": lambda: tiny_causal_lm("Qwen3", vocab=VOCAB, head_dim=16),  # q/k norms
    }[arch]()
    model = with_two_adapters(model)
    weights = {name: adapter_weights(model, name) for name in ("a", "b")}
    rows = [(None, _ids(5, 1)), ("a", _ids(30, 2)), ("b", _ids(3, 3)), ("a", _ids(9, 4))]
    fast, slow = BatchDecoder(model, 4, c_glue=True), BatchDecoder(model, 4, c_glue=False)
    assert fast.c_glue and not slow.c_glue
    for name, ids in rows:
        adapter = None if name is None else weights[name]
        assert torch.equal(fast.prefill(ids, adapter), slow.prefill(ids, adapter))  # torch both
    tokens = [1, 2, 3, 4]
    for step in range(6):
        if step == 3:  # a row leaves: the last one takes its place in both
            fast.release(1)
            slow.release(1)
            tokens = tokens[:3]
        got, expected = fast.step(tokens), slow.step(tokens)
        assert _relative(got, expected) < 1e-5
        assert torch.equal(got.argmax(-1), expected.argmax(-1))
        tokens = [int(t) for t in expected.argmax(-1)]


def test_c_glue_is_off_when_kernels_are_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    decoder = BatchDecoder(tiny_llama(seed=0, vocab=VOCAB), 2)
    assert decoder.c_glue
    monkeypatch.setenv(DISABLE_VARIABLE, "1")
    assert not decoder.c_glue
    decoder.prefill(_ids(4, 0))
    assert decoder.step([1]).shape == (1, VOCAB)  # the torch path


def test_c_glue_is_off_for_a_bf16_model() -> None:
    model = tiny_llama(seed=0, vocab=VOCAB).to(torch.bfloat16)
    assert not BatchDecoder(model, 1).c_glue


def _low_rank(rank: int, features: int, out: int, seed: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(rank, features, generator=generator),
        torch.randn(out, rank, generator=generator),
    )


def _prepared_site_adapters() -> tuple[list[PreparedAdapter], tuple[tuple[str, ...], ...]]:
    """Three adapters over the sites (q, k, v) and (o,): ranks 4, 8 and (k left alone) 2."""
    sites = (("q", "k", "v"), ("o",))
    outs = {"q": 24, "k": 8, "v": 8, "o": 16}
    adapters = []
    for seed, (rank, skipped) in enumerate(((4, None), (8, None), (2, "k"))):
        weights = {
            name: (*_low_rank(rank, 16, outs[name], 10 * seed + i), 0.5)
            for i, name in enumerate(outs)
            if name != skipped
        }
        adapters.append(prepare_adapter(weights, sites))
    return adapters, sites


def test_lora_rows_equals_the_torch_site_updates(glue: DecodeGlue) -> None:
    adapters, sites = _prepared_site_adapters()
    a, b, c = adapters
    # 12 rows: none, three adapters, and 9 rows of `a` (more than one group of 8 in C)
    row_adapters = [a, None, b, a, c, a, a, a, a, a, a, a]
    rows = len(row_adapters)
    table = site_table(row_adapters, len(sites))
    assert table is not None and table.shape == (2, rows)
    generator = torch.Generator().manual_seed(5)
    for site, widths in ((0, (24, 8, 8)), (1, (16,))):
        x = torch.randn(rows, 16, generator=generator)
        base = [torch.randn(rows, w, generator=generator) for w in widths]
        got = [t.clone() for t in base]
        glue.lora_rows(x, table, site, got)
        expected = [t.clone() for t in base]
        for adapter in adapters:
            members = torch.tensor([i for i, r in enumerate(row_adapters) if r is adapter])
            update = adapter.sites[site]
            if update is not None:
                add_site_update(expected, x, update, members)
        for g, e in zip(got, expected, strict=True):
            assert _relative(g, e) < 1e-5
        assert torch.equal(got[0][1], base[0][1])  # the row without an adapter: untouched
        # Each row's update does not depend on the batch: row 3 alone gives the same bits.
        alone = [t[3:4].clone() for t in base]
        glue.lora_rows(x[3:4].contiguous(), site_table([a], 2), site, alone)
        for one, batched in zip(alone, got, strict=True):
            assert torch.equal(one[0], batched[3])


def test_lora_rows_checks_the_descriptors_against_the_site(glue: DecodeGlue) -> None:
    adapters, _ = _prepared_site_adapters()
    table = site_table(adapters[:1], 2)
    assert table is not None
    x = torch.randn(1, 16)
    with pytest.raises(ValueError, match="reads 16 features"):
        glue.lora_rows(torch.randn(1, 12), table, 0, [torch.zeros(1, w) for w in (24, 8, 8)])
    with pytest.raises(ValueError, match="does not fit the site's output of 9"):
        glue.lora_rows(x, table, 0, [torch.zeros(1, w) for w in (24, 9, 8)])
    with pytest.raises(ValueError, match="site 2 of a site table"):
        glue.lora_rows(x, table, 2, [torch.zeros(1, 16)])
    assert site_table([None, None], 2) is None  # nothing to add


def test_sites_beyond_the_c_rank_limit_take_the_torch_path() -> None:
    weights = {"q": (*_low_rank(MAX_DESCRIBED_RANK + 1, 16, 8, 0), 1.0)}
    adapter = prepare_adapter(weights, (("q",),))
    assert adapter.sites[0] is not None and adapter.sites[0].descriptor is None
    assert site_table([adapter], 1) is None  # the decoder then adds it with torch


@pytest.mark.parametrize(
    ("arch", "kind", "double_quant"),
    [("llama", "nf4", True), ("qwen2", "int8", False), ("llama", "nf2", True)],
)
def test_the_c_decode_loop_equals_the_per_op_glue_bit_for_bit(
    arch: str, kind: str, double_quant: bool
) -> None:
    """A k-bit model runs every layer of a step in one C call (`DecodeGlue.layers`): the
    same kernels in the same order as the per-op glue, so the same bits, with and without
    adapters (several in one batch; qwen2: q/k/v biases), rows joining and leaving; and
    greedy tokens equal to the torch path's."""
    model = {
        "llama": lambda: tiny_llama(seed=0, vocab=VOCAB),
        "qwen2": lambda: tiny_causal_lm("Qwen2", vocab=VOCAB),
    }[arch]()
    quantize_model(model, QuantConfig(kind=kind, double_quant=double_quant))
    model = with_two_adapters(model)
    weights = {name: adapter_weights(model, name) for name in ("a", "b")}
    loop, per_op = BatchDecoder(model, 4), BatchDecoder(model, 4)
    slow = BatchDecoder(model, 4, c_glue=False)
    assert loop._description is not None  # the loop applies to this model
    per_op._description = None  # the per-op glue: its reference
    rows = [(None, _ids(5, 1)), ("a", _ids(30, 2)), ("b", _ids(3, 3)), ("a", _ids(9, 4))]
    for name, ids in rows:
        adapter = None if name is None else weights[name]
        for decoder in (loop, per_op, slow):
            decoder.prefill(ids, adapter)
    tokens = [1, 2, 3, 4]
    for step in range(6):
        if step == 3:
            for decoder in (loop, per_op, slow):
                decoder.release(0)
            tokens = [tokens[3], tokens[1], tokens[2]]  # the last row moved into row 0
        got, reference, torch_path = loop.step(tokens), per_op.step(tokens), slow.step(tokens)
        assert torch.equal(got, reference)
        assert _relative(got, torch_path) < 1e-5
        assert torch.equal(got.argmax(-1), torch_path.argmax(-1))
        tokens = [int(t) for t in torch_path.argmax(-1)]


def test_the_c_decode_loop_checks_the_layer_description(glue: DecodeGlue) -> None:
    model = tiny_llama(seed=0, vocab=VOCAB)
    quantize_model(model, QuantConfig(kind="nf4"))
    decoder = BatchDecoder(model, 1)
    assert decoder._description is not None
    decoder.prefill(_ids(3, 0))
    broken = decoder._description.clone()
    broken[0, 4 + 8] = 7  # q_proj's out features
    shape = LayerShape(64, 128, 4, 2, 16, decoder.cache.capacity, 0.25)
    caches = torch.tensor(
        [
            [k.data_ptr(), v.data_ptr()]
            for k, v in zip(decoder.cache.keys, decoder.cache.values, strict=True)
        ]
    )
    args = (torch.tensor([3]), torch.ones(1, 16), torch.zeros(1, 16), caches, None)
    with pytest.raises(ValueError, match="layer 0 projection 0 is 7 x 64"):
        glue.layers(broken, torch.randn(1, 64), shape, *args, torch.ones(64), 1e-5)
    with pytest.raises(ValueError, match="hidden is"):
        glue.layers(decoder._description, torch.randn(1, 32), shape, *args, torch.ones(64), 1e-5)
    outside = (torch.tensor([shape.capacity]), *args[1:])
    with pytest.raises(ValueError, match=r"layers: row 0's column \d+ is outside the cache"):
        glue.layers(decoder._description, torch.randn(1, 64), shape, *outside, torch.ones(64), 1e-5)
