"""LoftQ initialization against a float64 reference (quantize, exact SVD of the residual),
its compatibility promise (one round keeps the base byte-identical to plain quantization, so
a trained adapter works on a normally quantized base) and `init_loftq`, the init step run
after add_lora."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qlora.config import ConfigError, LoraConfig, QuantConfig
from qlora.nn import LoRALinear, QuantLinear, add_lora, lora_layers, quantize_model
from qlora.nn.loftq import LoftQReport, init_loftq, loftq_decompose, low_rank_factors
from qlora.quant import dequantize, quantize
from tests.tiny_models import tiny_llama

pytest.importorskip("transformers")


def _weight(out: int = 96, inp: int = 128, seed: int = 0) -> torch.Tensor:
    """Gaussian weight plus a few strong directions, as trained weights have."""
    gen = torch.Generator().manual_seed(seed)
    dense = torch.randn(out, inp, generator=gen) * 0.02
    spikes = torch.randn(out, 4, generator=gen) @ torch.randn(4, inp, generator=gen) * 0.01
    return dense + spikes


def _reference(weight: torch.Tensor, r: int, kind: str) -> tuple[torch.Tensor, float]:
    """One LoftQ round in float64: Q = quantize(W), rank-r SVD of W - Q, relative error."""
    q = dequantize(quantize(weight, kind, 64, True), torch.float32).double()
    residual = weight.double() - q
    u, s, vh = torch.linalg.svd(residual, full_matrices=False)
    fit = (u[:, :r] * s[:r]) @ vh[:r]
    error = float(torch.linalg.norm(residual - fit) / torch.linalg.norm(weight.double()))
    return q + fit, error


def test_low_rank_factors_are_the_truncated_svd() -> None:
    gen = torch.Generator().manual_seed(1)
    exact_rank = torch.randn(40, 6, generator=gen) @ torch.randn(6, 70, generator=gen)
    left, right = low_rank_factors(exact_rank, 6)
    assert left.shape == (40, 6) and right.shape == (6, 70)
    torch.testing.assert_close(left @ right, exact_rank, atol=1e-4, rtol=1e-4)
    # Balanced split: column i of L and row i of R both have norm sqrt(sigma_i).
    torch.testing.assert_close(left.norm(dim=0), right.norm(dim=1), atol=1e-4, rtol=1e-4)
    # Eckart-Young: the error of the rank-r fit is the norm of the dropped singular values.
    matrix = _weight()
    s = torch.linalg.svdvals(matrix.double())
    left, right = low_rank_factors(matrix, 8)
    error = float(torch.linalg.norm(matrix.double() - (left @ right).double()))
    assert error == pytest.approx(float(s[8:].norm()), rel=1e-4)


def test_randomized_svd_is_close_to_exact() -> None:
    matrix = _weight(300, 400, seed=2)
    errors = []
    for exact in (True, False):
        left, right = low_rank_factors(matrix, 8, exact=exact)
        errors.append(float(torch.linalg.norm(matrix - left @ right)))
    assert errors[1] <= errors[0] * 1.01


@pytest.mark.parametrize("kind", ["nf4", "fp4", "nf2", "int8"])
def test_one_round_matches_the_float64_reference(kind: str) -> None:
    weight, r, scaling = _weight(), 8, 2.0
    result = loftq_decompose(weight, r, scaling, kind, 64, True, iters=1)
    # The base is exactly plain quantization: same codes, same scales.
    plain = quantize(weight, kind, 64, True)
    ours, theirs = result.state.to_state_dict(), plain.to_state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    expected, expected_error = _reference(weight, r, kind)
    ours = dequantize(result.state, torch.float32) + scaling * result.lora_B @ result.lora_A
    torch.testing.assert_close(ours.double(), expected, atol=1e-5, rtol=0)
    assert result.errors[0] == pytest.approx(expected_error, rel=1e-3)
    assert result.errors[0] < result.quant_error  # the adapter absorbs part of the error
    assert result.lora_A.shape == (r, 128) and result.lora_B.shape == (96, r)


def test_more_rounds_keep_the_best_iterate_and_help_at_two_bits() -> None:
    weight = _weight(seed=3)
    one = loftq_decompose(weight, 8, 2.0, "nf2", iters=1)
    five = loftq_decompose(weight, 8, 2.0, "nf2", iters=5)
    assert len(five.errors) == 5 and five.errors[0] == pytest.approx(one.errors[0])
    final = torch.linalg.norm(
        weight - dequantize(five.state, torch.float32) - 2.0 * five.lora_B @ five.lora_A
    ) / torch.linalg.norm(weight)
    assert float(final) == pytest.approx(min(five.errors), rel=1e-4)
    assert min(five.errors) < one.errors[0]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="2-D"):
        loftq_decompose(torch.zeros(64), 4, 1.0)
    with pytest.raises(ValueError, match="iters"):
        loftq_decompose(_weight(), 4, 1.0, iters=0)
    with pytest.raises(ConfigError, match="loftq_iters"):
        LoraConfig(init="loftq", loftq_iters=0)


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _loftq(model: torch.nn.Module, lora: LoraConfig, quant: QuantConfig) -> LoftQReport:
    """The two steps a LoftQ run takes: add_lora on the full-precision model, then init_loftq."""
    add_lora(model, lora)
    return init_loftq(model, lora, quant, progress=False)


def test_init_loftq_starts_closer_to_the_full_precision_model(
    capsys: pytest.CaptureFixture[str],
) -> None:
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    reference = _logits(tiny_llama(seed=0), ids)
    quant = QuantConfig(kind="nf2")
    plain = quantize_model(tiny_llama(seed=0), quant)
    add_lora(plain, LoraConfig(r=8, alpha=16, dropout=0.0))
    loftq = tiny_llama(seed=0)
    report = _loftq(loftq, LoraConfig(r=8, alpha=16, dropout=0.0, init="loftq"), quant)
    assert capsys.readouterr().out == ""  # neither step prints; the caller prints the report
    assert len(report.fitted) == 14 and report.plain == []
    assert str(report).startswith("LoftQ nf2: 14 adapters fitted")
    for _, layer in lora_layers(loftq):
        assert isinstance(layer.base_layer, QuantLinear)
        assert layer.base_layer.quant_state.kind == "nf2"
        assert bool(layer.lora_B["default"].weight.abs().sum() > 0)
    trainable = {n for n, p in loftq.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    plain_gap = (_logits(plain, ids) - reference).norm()
    loftq_gap = (_logits(loftq, ids) - reference).norm()
    assert float(loftq_gap) < 0.8 * float(plain_gap)


def test_init_loftq_on_a_subset_quantizes_the_rest_plainly() -> None:
    model = tiny_llama(seed=0)
    report = _loftq(
        model, LoraConfig(r=4, target_modules=["q_proj"], init="loftq"), QuantConfig(kind="nf4")
    )
    assert sorted(report.fitted) == [f"model.layers.{i}.self_attn.q_proj" for i in (0, 1)]
    assert len(report.plain) == 12
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        f"model.layers.{i}.self_attn.q_proj.lora_{ab}.default.weight" for i in (0, 1) for ab in "AB"
    }
    for name, module in model.named_modules():
        if name.endswith("q_proj"):
            assert isinstance(module, LoRALinear)
            assert isinstance(module.base_layer, QuantLinear)
        elif name.endswith(("k_proj", "down_proj")):
            assert isinstance(module, QuantLinear)


def test_init_loftq_errors_name_the_fix() -> None:
    with pytest.raises(ValueError, match=r"quant\.kind is None"):
        _loftq(tiny_llama(seed=0), LoraConfig(init="loftq"), QuantConfig(kind=None))
    quantized = quantize_model(tiny_llama(seed=0), QuantConfig(kind="nf4"))
    with pytest.raises(ValueError, match=r"full-precision weight of model\.layers\.0.*quant=None"):
        _loftq(quantized, LoraConfig(init="loftq"), QuantConfig(kind="nf4"))


def test_one_round_adapter_works_on_a_normally_quantized_base(tmp_path: Path) -> None:
    """Train a LoftQ adapter (1 round), save it, load it over quantize_model's base: same logits."""
    from qlora.adapters import load_adapter, save_adapter
    from qlora.config import TrainConfig
    from qlora.train import train

    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    quant = QuantConfig(kind="fp4")
    model = tiny_llama(seed=0)
    _loftq(model, LoraConfig(r=4, alpha=8, init="loftq"), quant)
    batches = [{"input_ids": ids, "labels": ids.clone()}]
    config = TrainConfig(output_dir=str(tmp_path / "run"), max_steps=3, lr=1e-2, warmup_steps=0)
    train(model, config, batches, progress=False)
    save_adapter(model, tmp_path / "adapter")
    fresh = quantize_model(tiny_llama(seed=0), quant)
    load_adapter(fresh, tmp_path / "adapter")
    torch.testing.assert_close(_logits(fresh.eval(), ids), _logits(model.eval(), ids))


def test_several_rounds_warn_that_the_base_is_not_plain_quantization() -> None:
    config = LoraConfig(r=4, target_modules=["q_proj"], init="loftq", loftq_iters=2)
    with pytest.warns(UserWarning, match="loftq_iters=2"):
        _loftq(tiny_llama(seed=0), config, QuantConfig(kind="nf2"))
