"""lora_rows: an adapter's updates stacked per site equal the per-projection LoRA formula."""

from __future__ import annotations

import pytest
import torch

from qlora.models.lora_rows import add_site_update, prepare_adapter


def _low_rank(out: int, rank: int, scaling: float, seed: int) -> tuple:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(rank, 16, generator=generator), torch.randn(out, rank, generator=generator),
            scaling)  # fmt: skip


def test_site_update_is_scaling_b_a_x_on_the_chosen_rows() -> None:
    weights = {"q": _low_rank(8, 4, 2.0, 1), "v": _low_rank(6, 2, 0.75, 2)}
    prepared = prepare_adapter(weights, [("q", "k", "v"), ("o",)])
    assert prepared.sites[1] is None and prepared.sites[0] is not None
    x = torch.randn(5, 16)
    outs = [torch.zeros(5, 8), torch.zeros(5, 7), torch.zeros(5, 6)]
    rows = torch.tensor([0, 3])
    add_site_update(outs, x, prepared.sites[0], rows)
    for out, name in ((outs[0], "q"), (outs[2], "v")):
        weight_a, weight_b, scaling = weights[name]
        expected = (x[rows] @ weight_a.T @ weight_b.T) * scaling
        torch.testing.assert_close(out[rows], expected, rtol=1e-5, atol=1e-5)
        assert not out[[1, 2, 4]].any()  # other rows untouched
    assert not outs[1].any()  # k has no adapter


def test_a_layer_outside_the_sites_is_refused() -> None:
    with pytest.raises(ValueError, match=r"does not run .*embed"):
        prepare_adapter({"model.embed": _low_rank(4, 2, 1.0, 0)}, [("q",)])


def test_stacked_update_equals_each_rows_own_adapter() -> None:
    from qlora.models.lora_rows import add_stacked_update, row_layout, stack_adapters

    sites = [("q", "k", "v")]
    # Different ranks and projections per adapter: the stacking pads both.
    first = prepare_adapter({"q": _low_rank(8, 4, 2.0, 1), "v": _low_rank(6, 2, 0.5, 2)}, sites)
    second = prepare_adapter({"k": _low_rank(7, 3, 1.5, 3), "v": _low_rank(6, 5, 1.0, 4)}, sites)
    x = torch.randn(5, 16)
    adapters = [first, None, second, first, second]
    stacked = stack_adapters([first, second])
    layout = row_layout([0, None, 1, 0, 1], groups=2)
    outs = [torch.zeros(5, 8), torch.zeros(5, 7), torch.zeros(5, 6)]
    add_stacked_update(outs, x, stacked.sites[0], layout)
    for row, adapter in enumerate(adapters):
        expected = [torch.zeros(1, 8), torch.zeros(1, 7), torch.zeros(1, 6)]
        if adapter is not None:
            add_site_update(expected, x[row : row + 1], adapter.sites[0], None)
        for got, want in zip(outs, expected, strict=True):
            torch.testing.assert_close(got[row : row + 1], want, rtol=1e-5, atol=1e-6)
