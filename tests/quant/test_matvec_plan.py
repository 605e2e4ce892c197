"""MatvecPlan: the fused kernel with prepared arguments gives quantized_matmul_few's bits."""

from __future__ import annotations

import pytest
import torch

from qlora.quant import quantize
from qlora.quant.matvec import MATVEC_MAX_ROWS, quantized_matmul_few
from qlora.quant.matvec_plan import MatvecPlan


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8", "nf2"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("rows", [1, 3, MATVEC_MAX_ROWS + 1])
def test_plan_equals_quantized_matmul_few(kind: str, double_quant: bool, rows: int) -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 256, generator=generator)
    state = quantize(weight, kind, blocksize=64, double_quant=double_quant)
    plan = MatvecPlan.create(state)
    if plan is None:
        pytest.skip("the matvec extension is not built")
    x = torch.randn(rows, 256, generator=generator)
    assert torch.equal(plan(x), quantized_matmul_few(x, state))


def test_disabled_kernels_take_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    state = quantize(torch.randn(32, 128), "nf4", blocksize=64)
    plan = MatvecPlan.create(state)
    if plan is None:
        pytest.skip("the matvec extension is not built")
    x = torch.randn(2, 128)
    monkeypatch.setenv("QLORA_DISABLE_KERNELS", "1")
    assert torch.equal(plan(x), quantized_matmul_few(x, state))
