import torch

from qlora.quant.codebooks import (
    BITS,
    KINDS,
    codebook,
    decision_bounds,
    dynamic_map,
    normal_float_codebook,
    normal_float_offset,
)

# The NF4 table as published in the QLoRA paper's appendix / bitsandbytes (float32 values).
PUBLISHED_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]  # fmt: skip


def test_nf4_derivation_reproduces_published_table_bit_for_bit() -> None:
    assert torch.equal(normal_float_codebook(4), torch.tensor(PUBLISHED_NF4))


def test_normal_float_tables_are_sorted_span_unit_interval_and_keep_zero() -> None:
    for bits in (2, 3, 4, 5):
        table = normal_float_codebook(bits)
        assert table.numel() == 2**bits
        assert torch.all(table[1:] > table[:-1])
        assert table[0] == -1.0 and table[-1] == 1.0
        assert (table == 0).sum() == 1
        # one more positive code than negative ones (the asymmetric NF construction)
        assert (table > 0).sum() == 2 ** (bits - 1)


def test_nf2_values_and_offset() -> None:
    assert abs(normal_float_offset(2) - (0.5 * ((1 - 1 / 6) + (1 - 1 / 8)))) < 1e-12
    torch.testing.assert_close(
        codebook("nf2"), torch.tensor([-1.0, 0.0, 0.4358, 1.0]), atol=1e-4, rtol=0
    )


def test_fp4_is_e2m1_normalized() -> None:
    table = codebook("fp4")
    assert table.abs().max() == 1.0
    assert torch.equal(table[8:], -table[:8])
    assert sorted((table[:8] * 12).tolist()) == [0, 0.0625, 2, 3, 4, 6, 8, 12]


def test_int8_codes() -> None:
    table = codebook("int8")
    assert table[128] == 0 and table[255] == 1.0 and table[1] == -1.0


def test_dynamic_map_is_sorted_signed_and_has_256_distinct_entries() -> None:
    table = dynamic_map()
    assert table.numel() == 256 and len(set(table.tolist())) == 256
    assert torch.all(table[1:] > table[:-1])
    assert table[-1] == 1.0 and 0.0 in table.tolist()


def test_decision_bounds_pick_nearest_code() -> None:
    for kind in KINDS:
        bounds, order = decision_bounds(kind)
        table = codebook(kind)
        values = torch.linspace(-1, 1, 10001)
        picked = table[order[torch.bucketize(values, bounds)]]
        nearest = (values[:, None] - table[None, :]).abs().min(dim=1).values
        torch.testing.assert_close((values - picked).abs(), nearest, atol=1e-7, rtol=0)
        assert BITS[kind] in (2, 4, 8)
