"""`fast_decoding`: CPU decoding through the fused few-row kernel, opt-in and equal to the
exact path up to float32 summation order (greedy tokens identical on the default model)."""

from __future__ import annotations

import pytest
import torch

import qlora.nn.qlinear as qlinear_module
from qlora.kernels import c_extension
from qlora.nn import QuantLinear, fast_decoding
from qlora.quant import quantize
from qlora.quant.matvec import MATVEC_RTOL

needs_kernel = pytest.mark.skipif(c_extension("matvec") is None, reason="matvec not built")


def _layer() -> QuantLinear:
    weight = torch.randn(96, 256)  # [out, in]
    return QuantLinear(quantize(weight, "nf4", 64, True), torch.randn(96))


@needs_kernel
def test_only_inside_the_context_and_without_autograd(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = qlinear_module.quantized_matmul_few
    monkeypatch.setattr(
        qlinear_module, "quantized_matmul_few", lambda x, s: calls.append(1) or real(x, s)
    )
    layer, x = _layer(), torch.randn(3, 256)
    with torch.no_grad():
        exact = layer(x)  # outside: dequantize-then-matmul, bit for bit
        assert not calls
        with fast_decoding():
            fast = layer(x)
        assert calls == [1]
    with fast_decoding():
        layer(x)  # autograd on: the exact, differentiable path
    assert calls == [1]
    bound = MATVEC_RTOL * (x.abs() @ layer.dequantized_weight().abs().t()) + 1e-6
    assert ((fast - exact).abs() <= bound).all()
    assert torch.equal(exact, x @ layer.dequantized_weight().t() + layer.bias)


@needs_kernel
def test_greedy_generation_is_unchanged_on_the_default_model() -> None:
    from qlora.generate import prompt_tensor
    from qlora.models import ModelLoadError, load_model

    try:
        model, tok = load_model("smollm2-135m", "nf4", progress=False)
    except ModelLoadError as err:
        pytest.skip(str(err))
    ids = prompt_tensor(tok, [{"role": "user", "content": "Name three rivers in Europe."}])
    kwargs = {"max_new_tokens": 24, "do_sample": False, "pad_token_id": tok.eos_token_id}
    with torch.no_grad():
        exact = model.generate(ids, **kwargs)
        with fast_decoding():
            fast = model.generate(ids, **kwargs)
    assert torch.equal(fast, exact)
