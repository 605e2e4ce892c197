"""bfloat16 compute for the frozen base, float32 everywhere else.

Oracles: the composed modules (`LoRALinear.reference_forward`, autograd) for the fused path;
``F.linear`` on bf16-rounded operands for `CastLinear`; ``F.cross_entropy`` on logits from
bf16-rounded operands for the chunked loss; the float32 model for the whole-model checks
(within bf16 rounding).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qlora import LoraConfig, QuantConfig, add_lora, load_model, quantize_model
from qlora.hardware import choose_compute_dtype
from qlora.nn import LoRALinear, QuantLinear
from qlora.nn.cast_linear import CastLinear
from qlora.nn.inject import frozen_compute_dtype
from qlora.nn.lora_fused import fused_lora_supported
from qlora.train.loss import causal_lm_loss, chunked_cross_entropy
from tests.nn.test_lora_fused import _grads  # output, then the x, A and B gradients
from tests.tiny_models import tiny_llama

BF16 = torch.bfloat16


def _layer(base: nn.Module, dropout: float = 0.0) -> LoRALinear:
    torch.manual_seed(1)
    layer = LoRALinear(base, "default", r=8, alpha=16, dropout=dropout)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.1)
    return layer


def _bases(bias: bool) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    linear = nn.Linear(80, 96, bias=bias).requires_grad_(False)
    return {
        "nf4": QuantLinear.from_linear(linear, "nf4", compute_dtype=BF16),
        "cast": CastLinear.from_linear(linear, BF16),
    }


@pytest.mark.parametrize("kind", ["nf4", "cast"])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_path_equals_the_composed_modules_in_bf16(kind: str, bias: bool) -> None:
    layer = _layer(_bases(bias)[kind])
    x = torch.randn(2, 7, 80)
    assert fused_lora_supported(layer.base_layer, x, layer.lora_A["default"].weight, nn.Identity())
    fused = _grads(layer, x, layer)
    reference = _grads(layer, x, layer.reference_forward)
    for got, want in zip(fused, reference, strict=True):
        assert got.dtype == torch.float32  # activations and adapter gradients stay float32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bf16_base_differs_from_float32_by_bf16_rounding_only() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(80, 96).requires_grad_(False)
    x = torch.randn(16, 80)
    fp32 = _layer(QuantLinear.from_linear(linear, "nf4"))(x)
    bf16 = _layer(QuantLinear.from_linear(linear, "nf4", compute_dtype=BF16))(x)
    error = (bf16 - fp32).abs().max() / fp32.abs().max()
    assert 0 < error < 2e-2


def test_dora_over_a_bf16_base_takes_the_reference_path() -> None:
    base = _bases(False)["nf4"]
    torch.manual_seed(1)
    layer = LoRALinear(base)
    layer.add_adapter("default", r=8, alpha=16, use_dora=True)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.1)
    x = torch.randn(4, 80)
    assert torch.equal(layer(x), layer.reference_forward(x))


def test_cast_linear_is_a_linear_in_bf16_with_a_float32_bias() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(80, 96)
    cast = CastLinear.from_linear(linear, BF16)
    assert isinstance(cast, nn.Linear) and cast.weight.dtype == BF16
    assert cast.bias.dtype == torch.float32 and not cast.weight.requires_grad
    x = torch.randn(3, 80)
    want = F.linear(x.to(BF16), linear.weight.to(BF16)).float() + linear.bias
    assert torch.equal(cast(x), want)
    assert set(cast.state_dict()) == set(linear.state_dict())
    assert cast(x.to(BF16)).dtype == BF16  # bf16 activations stay bf16


def _save(tmp_path: Path) -> Path:
    model = tiny_llama(seed=0)
    model.save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


def test_loader_stores_an_unquantized_base_in_the_compute_dtype(tmp_path: Path) -> None:
    directory = _save(tmp_path)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    fp32, _ = load_model(
        directory,
        quant=QuantConfig(kind=None, compute_dtype="float32"),
        tokenizer=False,
        progress=False,
    )
    bf16, _ = load_model(
        directory,
        quant=QuantConfig(kind=None, compute_dtype="bfloat16"),
        tokenizer=False,
        progress=False,
    )
    assert not any(isinstance(m, CastLinear) for m in fp32.modules())
    casts = [n for n, m in bf16.named_modules() if isinstance(m, CastLinear)]
    assert len(casts) == 2 * 7 and all(bf16.get_submodule(n).weight.dtype == BF16 for n in casts)
    assert bf16.lm_head.weight.dtype == torch.float32  # the head, norms, embeddings: float32
    assert bf16.model.embed_tokens.weight.dtype == torch.float32
    assert frozen_compute_dtype(bf16) == BF16 and frozen_compute_dtype(fp32) is None
    with torch.no_grad():
        a, b = fp32(ids).logits, bf16(ids).logits
    assert b.dtype == torch.float32
    assert 0 < (a - b).abs().max() < 0.05 * a.abs().max()
    add_lora(bf16, LoraConfig(r=4, alpha=8))
    assert frozen_compute_dtype(bf16) == BF16


def test_auto_resolves_to_the_hardware_choice(tmp_path: Path) -> None:
    directory = _save(tmp_path)
    model, _ = load_model(directory, quant=QuantConfig(kind="nf4"), tokenizer=False, progress=False)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert {m.compute_dtype for m in layers} == {choose_compute_dtype("cpu").dtype}
    plain, _ = load_model(directory, quant="nf4", tokenizer=False, progress=False)
    assert {m.compute_dtype for m in plain.modules() if isinstance(m, QuantLinear)} == {
        torch.float32
    }
    quantized = quantize_model(tiny_llama(seed=0), QuantConfig(kind="nf4"))
    assert frozen_compute_dtype(quantized) == choose_compute_dtype("cpu").dtype


# -- the chunked loss ---------------------------------------------------------------------------


def test_chunked_loss_in_bf16_equals_its_reference() -> None:
    torch.manual_seed(0)
    head = nn.Linear(32, 300, bias=False).requires_grad_(False)
    hidden = torch.randn(2, 11, 32, requires_grad=True)
    labels = torch.randint(0, 300, (2, 11))
    labels[0, :3] = -100
    loss, count = chunked_cross_entropy(hidden, head, labels, chunk=7, compute_dtype=BF16)
    loss.backward()
    got = hidden.grad.clone()
    hidden.grad = None
    logits = (hidden.to(BF16) @ head.weight.to(BF16).t()).float()  # [2, 11, 300]
    want = F.cross_entropy(
        logits[:, :-1].reshape(-1, 300), labels[:, 1:].reshape(-1), reduction="sum"
    )
    assert count == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
    # ∂L/∂h = (softmax - onehot) W, the product taken in bf16 as forward does
    probs = logits.softmax(-1)[:, :-1].reshape(-1, 300)
    targets = labels[:, 1:].reshape(-1)
    probs[torch.arange(len(targets)), targets.clamp(min=0)] -= 1
    probs[targets == -100] = 0
    grad = torch.zeros(2, 11, 32)
    grad[:, :-1] = (probs.to(BF16) @ head.weight.to(BF16)).float().view(2, 10, 32)
    torch.testing.assert_close(got, grad, rtol=1e-2, atol=1e-3)


def test_a_trained_head_keeps_float32() -> None:
    torch.manual_seed(0)
    head = nn.Linear(32, 300)
    hidden = torch.randn(1, 9, 32)
    labels = torch.randint(0, 300, (1, 9))
    fp32, _ = chunked_cross_entropy(hidden, head, labels, compute_dtype=torch.float32)
    bf16, _ = chunked_cross_entropy(hidden, head, labels, compute_dtype=BF16)
    assert torch.equal(fp32, bf16)


def test_the_loss_follows_the_base_compute_dtype() -> None:
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    losses = {}
    for dtype in ("float32", "bfloat16"):
        model = quantize_model(tiny_llama(seed=0), QuantConfig(kind="nf4", compute_dtype=dtype))
        add_lora(model, LoraConfig(r=4, alpha=8))
        loss, _ = causal_lm_loss(model, ids, ids)
        losses[dtype] = float(loss.detach())
    assert losses["float32"] != losses["bfloat16"]
    assert abs(losses["float32"] - losses["bfloat16"]) < 1e-2 * losses["float32"]


def test_merging_into_a_cast_linear_keeps_the_adapter_exact() -> None:
    from qlora.nn.lora import delta_weight, merge_adapter, unmerge_adapter

    layer = _layer(_bases(True)["cast"]).eval()
    x = torch.randn(6, 80)
    with torch.no_grad():
        unmerged = layer(x)
        cast = layer.base_layer
        merge_adapter(layer)
        merged_base = layer.base_layer
        assert type(merged_base) is nn.Linear and merged_base.weight.dtype == torch.float32
        # W (bf16 values) + ΔW held in float32: ΔW is not rounded to bf16's 8-bit mantissa
        want = F.linear(x, cast.weight.float() + delta_weight(layer, "default"), cast.bias)
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
        assert (layer(x) - unmerged).abs().max() < 0.05 * unmerged.abs().max()
        unmerge_adapter(layer)
        assert layer.base_layer is cast
        assert torch.equal(layer(x), unmerged)


@pytest.mark.parametrize("kind", ["nf4", "cast"])
def test_inference_mode_takes_the_bf16_path_too(kind: str) -> None:
    """Inference tensors have no version counter: the rounded input is copied, not cached."""
    layer = _layer(_bases(True)[kind]).eval()
    x = torch.randn(2, 128, 80)
    with torch.no_grad():
        want = layer(x)
    with torch.inference_mode():
        got = layer(x.clone())
    assert torch.equal(got, want)


def test_rounded_copies_are_reused_only_for_the_same_unchanged_rows() -> None:
    from qlora.quant.scratch import release_scratch, rounded_copy

    rows = torch.randn(6, 8)
    first = rounded_copy(rows, BF16, "test-in", reuse=True)
    assert torch.equal(first, rows.to(BF16))
    assert rounded_copy(rows, BF16, "test-in", reuse=True).data_ptr() == first.data_ptr()
    rows.mul_(2)  # in place: the version counter moves, so the copy is made again
    assert torch.equal(rounded_copy(rows, BF16, "test-in", reuse=True), rows.to(BF16))
    other = torch.randn(6, 8)
    rounded_copy(other, BF16, "test-in")  # a plain copy into the slot forgets the held rows
    assert torch.equal(rounded_copy(rows, BF16, "test-in", reuse=True), rows.to(BF16))
    release_scratch()
    assert torch.equal(rounded_copy(rows, BF16, "test-in", reuse=True), rows.to(BF16))
    release_scratch()


def test_the_gpu_choice_needs_native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    old = choose_compute_dtype("cuda")
    assert old.dtype == torch.float32 and "sm_75" in old.reason
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert choose_compute_dtype("cuda:1").dtype == BF16


def test_an_unquantized_base_is_only_ever_narrowed(tmp_path: Path) -> None:
    """float32 compute over a bf16 model (auto on an AVX2 CPU) keeps the model as it is."""
    from qlora.config import ModelConfig

    directory = _save(tmp_path)
    model, _ = load_model(
        ModelConfig(source=str(directory), dtype="bfloat16", device="cpu"),
        QuantConfig(kind=None, compute_dtype="float32"),
        tokenizer=False,
        progress=False,
    )
    assert not any(isinstance(m, CastLinear) for m in model.modules())
    assert model.model.layers[0].mlp.up_proj.weight.dtype == BF16


def test_merged_export_writes_unadapted_cast_weights_in_float32(tmp_path: Path) -> None:
    from qlora.adapters.merge import merged_state_dict

    directory = _save(tmp_path)
    quant = QuantConfig(kind=None, compute_dtype="bfloat16")
    model, _ = load_model(directory, quant=quant, tokenizer=False, progress=False)
    add_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj"]))
    state = merged_state_dict(model)
    assert {t.dtype for t in state.values() if t.is_floating_point()} == {torch.float32}


def test_half_precision_swiglu_keeps_autograd() -> None:
    from qlora.nn.swiglu import swiglu

    gate = torch.randn(4, 8, dtype=BF16, requires_grad=True)
    up = torch.randn(4, 8, dtype=BF16, requires_grad=True)
    assert "SwiGLU" not in type(swiglu(gate, up).grad_fn).__name__
