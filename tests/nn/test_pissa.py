"""PiSSA: the split against its definition and against the real PEFT, QPiSSA's smaller base
error, and the conversion to a plain rank-2r LoRA adapter over the original weights."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

from qlora import LoraConfig, QuantConfig, add_lora
from qlora.nn import LoRALinear, QuantLinear, lora_layers
from qlora.nn.pissa import init_pissa, pissa_split, pissa_to_lora
from tests.tiny_models import tiny_llama


@pytest.mark.parametrize("niter", [0, 4])
def test_the_split_is_exact_and_the_adapter_holds_the_principal_part(niter: int) -> None:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 80, generator=gen)
    a0, b0, residual = pissa_split(weight, 8, 2.0, niter)
    assert a0.shape == (8, 80) and b0.shape == (48, 8)
    assert torch.allclose(residual + 2.0 * b0 @ a0, weight, atol=1e-5)  # W unchanged
    values = torch.linalg.svdvals(weight)
    principal = torch.linalg.norm(2.0 * b0 @ a0)
    # the adapter holds (about, for the randomized SVD) the top-8 singular values' energy
    assert abs(float(principal) - float(values[:8].square().sum().sqrt())) < 0.05 * principal
    assert torch.allclose(torch.linalg.svdvals(residual)[:8], values[8:16], rtol=0.1)


def _ours(niter: int, quant: QuantConfig | None = None) -> tuple[nn.Module, object]:
    model = tiny_llama(seed=0)
    lora = LoraConfig(r=4, alpha=8, dropout=0.0, init="pissa", pissa_niter=niter)
    add_lora(model, lora)
    torch.manual_seed(7)  # the randomized SVD draws here, as PEFT's does in get_peft_model
    return model, init_pissa(model, lora, quant, progress=False)


@pytest.mark.compat
@pytest.mark.parametrize("niter", [0, 4])
def test_equal_to_peft_pissa(niter: int) -> None:
    """The exact SVD: A, B and the residual base equal PEFT's bit for bit. The randomized one
    draws from torch's RNG in an order that depends on how each library interleaves its
    other draws (and a random matrix's flat spectrum leaves its top-4 subspace loosely
    determined), so there both must just reproduce the original model."""
    peft: ModuleType = pytest.importorskip("peft")
    init = "pissa" if niter == 0 else f"pissa_niter_{niter}"
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=init)
    torch.manual_seed(7)
    theirs = peft.get_peft_model(tiny_llama(seed=0), config)
    ours, _ = _ours(niter)
    mine = dict(ours.named_parameters())
    for name, param in theirs.named_parameters():
        key = name.removeprefix("base_model.model.")
        if niter == 0:
            assert torch.equal(param, mine[key]), key  # A, B and the residual base weights
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, tiny_llama(seed=0)(ids).logits, atol=1e-5)
        assert torch.allclose(ours(ids).logits, theirs(ids).logits, atol=1e-5)
    if niter == 0:  # and the same adapter gradients
        ours(input_ids=ids, labels=ids).loss.backward()
        theirs(input_ids=ids, labels=ids).loss.backward()
        for name, param in theirs.named_parameters():
            if param.grad is not None:
                mine_grad = mine[name.removeprefix("base_model.model.")].grad
                scale = float(param.grad.abs().max()) + 1e-12
                assert float((mine_grad - param.grad).abs().max()) / scale <= 1e-4, name


def test_qpissa_quantizes_the_residual_with_less_error() -> None:
    model, report = _ours(0, QuantConfig(kind="nf4"))
    assert all(isinstance(layer.base_layer, QuantLinear) for _, layer in lora_layers(model))
    assert len(report.quant_error) == 14
    plain = sum(e[0] for e in report.quant_error.values())
    ours = sum(e[1] for e in report.quant_error.values())
    assert ours < plain  # the principal part stays in float32
    assert "QPiSSA" in str(report)


def test_conversion_to_lora_over_the_original_weights() -> None:
    model, report = _ours(0)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # "training": move A and B
        for _, layer in lora_layers(model):
            for weight in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
                weight.add_(torch.randn(weight.shape, generator=gen) * 0.05)
    final = {
        name: (layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach())
        for name, layer in lora_layers(model)
    }
    converted = pissa_to_lora(final, report.initial)
    plain = tiny_llama(seed=0)  # the original W, a rank-8 LoRA with the same scaling
    add_lora(plain, LoraConfig(r=8, alpha=16, dropout=0.0))
    with torch.no_grad():
        for name, (lora_a, lora_b) in converted.items():
            layer = plain.get_submodule(name)
            assert isinstance(layer, LoRALinear)
            layer.lora_A["default"].weight.copy_(lora_a)
            layer.lora_B["default"].weight.copy_(lora_b)
    ids = torch.randint(0, 128, (2, 7), generator=gen)
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, model(ids).logits, atol=1e-5)


def test_pissa_needs_the_full_precision_weights() -> None:
    from qlora import quantize_model

    model = quantize_model(tiny_llama(seed=0), QuantConfig(kind="nf4"))
    lora = LoraConfig(r=4, alpha=8, init="pissa")
    add_lora(model, lora)
    with pytest.raises(ValueError, match=r"needs the full-precision weight of .* QuantLinear"):
        init_pissa(model, lora, None, progress=False)


def _trained(model: nn.Module, seed: int = 3) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # "training": move A and B away from the split
        for _, layer in lora_layers(model):
            for weight in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
                weight.add_(torch.randn(weight.shape, generator=gen) * 0.05)
    return model


def _logits(model: nn.Module) -> torch.Tensor:
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.compat
def test_pissa_files_with_peft_both_ways_and_converted(tmp_path: Path) -> None:
    import json

    from qlora.adapters import load_adapter, save_adapter

    peft: ModuleType = pytest.importorskip("peft")
    ours, report = _ours(0)
    _trained(ours)
    save_adapter(ours, tmp_path / "pissa")
    config = json.loads((tmp_path / "pissa" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] == "pissa" and config["r"] == 4
    # PEFT redoes the split on the original model and loads the trained factors
    theirs = peft.PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path / "pissa")
    assert torch.allclose(_logits(theirs), _logits(ours), atol=1e-5)
    # and ours does the same with a PEFT-written one
    theirs.save_pretrained(tmp_path / "peft")
    again = tiny_llama(seed=0)
    load_adapter(again, tmp_path / "peft")
    assert torch.allclose(_logits(again), _logits(ours), atol=1e-5)
    # converted: a plain rank-8 LoRA over the original weights, which any loader applies
    save_adapter(ours, tmp_path / "lora", pissa_initial=report.initial)
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert (config["init_lora_weights"], config["r"], config["lora_alpha"]) == (True, 8, 16)
    plain = peft.PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path / "lora")
    assert torch.allclose(_logits(plain), _logits(ours), atol=1e-5)
    loaded = tiny_llama(seed=0)
    load_adapter(loaded, tmp_path / "lora")
    assert torch.allclose(_logits(loaded), _logits(ours), atol=1e-5)


def test_a_pissa_adapter_on_a_quantized_base_is_refused_untouched(tmp_path: Path) -> None:
    from qlora import quantize_model
    from qlora.adapters import load_adapter, save_adapter
    from qlora.adapters._peft_files import AdapterFormatError

    ours, _ = _ours(0)
    save_adapter(_trained(ours), tmp_path)
    base = quantize_model(tiny_llama(seed=0), QuantConfig(kind="nf4"))
    before = _logits(base)
    with pytest.raises(AdapterFormatError, match=r"splitting the full-precision weights again"):
        load_adapter(base, tmp_path)
    assert not list(lora_layers(base)) and torch.equal(_logits(base), before)


@pytest.mark.parametrize("kind", ["nf4", None])
def test_splitting_while_loading_equals_init_pissa(tmp_path: Path, kind: str | None) -> None:
    """`PissaSplit` in the loader (each weight split as it streams in, the residual quantized
    there) gives what loading in full precision and then `init_pissa` gives, bit for bit."""
    from qlora import load_model
    from qlora.nn.pissa import PissaSplit

    tiny_llama(seed=0, layers=3).save_pretrained(tmp_path)
    lora = LoraConfig(r=4, alpha=8, dropout=0.0, init="pissa")
    quant = QuantConfig(kind=kind, compute_dtype="float32")  # None: no bf16 CastLinear
    split = PissaSplit(lora, seed=0)
    streamed, _ = load_model(tmp_path, quant, tokenizer=False, progress=False, split=split)
    report = split.finish(streamed)
    whole, _ = load_model(tmp_path, None, tokenizer=False, progress=False)
    add_lora(whole, lora)
    expected = init_pissa(whole, lora, quant if kind else None, progress=False)
    assert report.initial.keys() == expected.initial.keys() and len(report.initial) == 21
    ours, theirs = streamed.state_dict(), whole.state_dict()
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key  # adapters, residual (packed) bytes, all
