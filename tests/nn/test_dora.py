"""DoRA in LoRALinear: the closed-form norm against the direct one, forward and gradients
against a plain-autograd reference with a dense weight, dropout as PEFT applies it, merging.
(Against PEFT itself: tests/adapters/test_dora_peft.py.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qlora.nn import LoRALinear, QuantLinear, merge_adapter, merged_weight, unmerge_adapter
from qlora.nn.dora import base_row_norms_sq, dense_base_weight, reference_weight_norm, weight_norm
from qlora.nn.dropout import draw_seeds, keep_mask_reference
from qlora.nn.lora_fused import fused_lora_supported
from tests.nn.test_lora_fused import requires_kernel

IN, OUT, R = 96, 40, 8


def _base(kind: str | None, bias: bool = True) -> nn.Module:
    torch.manual_seed(0)
    linear = nn.Linear(IN, OUT, bias=bias).requires_grad_(False)  # frozen, as add_lora does
    return linear if kind is None else QuantLinear.from_linear(linear, kind=kind, blocksize=64)


def _dora(kind: str | None, bias: bool = True, dropout: float = 0.0) -> LoRALinear:
    layer = LoRALinear(_base(kind, bias))
    layer.add_adapter("default", r=R, alpha=16, dropout=dropout, use_dora=True)
    layer.set_adapter("default")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B (and m) away from their initial values: every term counts
        layer.lora_B["default"].weight.copy_(torch.randn(OUT, R, generator=gen) * 0.2)
        layer.lora_magnitude_vector["default"].mul_(1 + 0.1 * torch.randn(OUT, generator=gen))
    return layer


def _reference(layer: LoRALinear, x: torch.Tensor) -> torch.Tensor:
    """bias + (m / n) ⊙ (W x + s·B·A x), n = ‖W + s·B·A‖ detached, with a dense float W."""
    weight = dense_base_weight(layer.base_layer)  # [out, in]
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    s, m = layer.scaling["default"], layer.lora_magnitude_vector["default"]
    norm = torch.linalg.norm(weight + s * (b @ a), dim=1).detach()  # [out]
    out = (m / norm) * (F.linear(x, weight) + s * F.linear(F.linear(x, a), b))
    bias = layer.base_layer.bias
    return out if bias is None else out + bias


@pytest.mark.parametrize("kind", [None, "nf4", "int8", "nf2"])
def test_the_closed_form_norm_equals_the_direct_one(kind: str | None) -> None:
    layer = _dora(kind)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    weight = dense_base_weight(layer.base_layer)
    direct = reference_weight_norm(weight, a, b, layer.scaling["default"])
    closed = weight_norm(layer.base_layer, base_row_norms_sq(layer.base_layer), a, b, 2.0)
    assert torch.allclose(closed, direct, rtol=1e-6, atol=0), (closed - direct).abs().max()


@pytest.mark.parametrize("kind", [None, "nf4"])
def test_a_fresh_dora_adapter_leaves_the_output_unchanged(kind: str | None) -> None:
    layer = LoRALinear(_base(kind))
    x = torch.randn(3, 5, IN)
    before = layer(x)
    layer.add_adapter("default", r=R, alpha=16, use_dora=True)
    layer.set_adapter("default")
    magnitude = layer.lora_magnitude_vector["default"]
    assert magnitude.shape == (OUT,) and magnitude.requires_grad
    assert torch.equal(layer(x), before)  # m = n exactly at the start: m / n - 1 = 0


@pytest.mark.parametrize("path", ["fused", "reference"])
@pytest.mark.parametrize("kind", [None, "nf4", "int8"])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_gradients_equal_the_dense_reference(
    kind: str | None, bias: bool, path: str
) -> None:
    """Both paths: `fused_dora` (float32 on the CPU: what `forward` takes here) and the
    composed `reference_forward`."""
    layer = _dora(kind, bias)
    x = torch.randn(2, 7, IN, requires_grad=True)
    params = [
        layer.lora_A["default"].weight,
        layer.lora_B["default"].weight,
        layer.lora_magnitude_vector["default"],
    ]
    grad_out = torch.randn(2, 7, OUT)
    assert fused_lora_supported(layer.base_layer, x, params[0], layer.lora_dropout["default"])
    ours = layer(x) if path == "fused" else layer.reference_forward(x)
    got = torch.autograd.grad(ours, [x, *params], grad_out)
    expected_out = _reference(layer, x)
    expected = torch.autograd.grad(expected_out, [x, *params], grad_out)
    assert torch.allclose(ours, expected_out, atol=1e-5, rtol=1e-5)
    for g, e in zip(got, expected, strict=True):
        assert torch.allclose(g, e, atol=1e-5, rtol=1e-5), (g - e).abs().max()


@requires_kernel
@pytest.mark.parametrize("kind", [None, "nf4"])
def test_fused_dropout_drops_the_adapter_input_only(kind: str | None) -> None:
    """The fused path's form with dropout: (m/ν) ⊙ (x Wᵀ + s·D(x) Aᵀ Bᵀ) + b (see
    qlora.nn.dora_fused), against a dense reference given the same keep-mask."""
    p = 0.25
    layer = _dora(kind, dropout=p).train()
    x = torch.randn(6, IN, requires_grad=True)
    params = [x, layer.lora_A["default"].weight, layer.lora_B["default"].weight,
              layer.lora_magnitude_vector["default"]]  # fmt: skip
    grad_out = torch.randn(6, OUT)
    torch.manual_seed(11)
    got = torch.autograd.grad(layer(x), params, grad_out)
    torch.manual_seed(11)
    keep = keep_mask_reference(x.numel(), draw_seeds(), p).view(x.shape)
    weight = dense_base_weight(layer.base_layer)
    a, b = params[1], params[2]
    s, m = layer.scaling["default"], params[3]
    norm = torch.linalg.norm(weight + s * (b @ a), dim=1).detach()
    dropped = torch.where(keep, x / (1 - p), torch.zeros(()))
    expected_out = (m / norm) * (F.linear(x, weight) + s * F.linear(F.linear(dropped, a), b))
    expected_out = expected_out + layer.base_layer.bias
    expected = torch.autograd.grad(expected_out, params, grad_out)
    for g, e in zip(got, expected, strict=True):
        assert torch.allclose(g, e, atol=1e-5, rtol=1e-5), (g - e).abs().max()


def test_fused_dora_keeps_no_copy_of_the_output() -> None:
    """It saves its output (the next op usually keeps it too), not z beside it."""
    layer = _dora("nf4")
    x = torch.randn(16, IN, requires_grad=True)
    y = layer(x)
    function = y.grad_fn.next_functions[0][0]  # under the final view
    saved = [t for t in function.saved_tensors if t.shape == (16, OUT)]
    assert len(saved) == 1 and saved[0].data_ptr() == y.data_ptr()


def test_the_reference_path_applies_dropout_as_peft() -> None:
    """In training with dropout PEFT adds (m/n - 1)·W·drop(x) + (m/n)·s·B·A·drop(x) to the
    base output on the whole x: the base is multiplied twice. `reference_forward` does too."""
    layer = _dora("nf4", dropout=0.3).train()
    x = torch.randn(4, IN)
    torch.manual_seed(9)
    ours = layer.reference_forward(x)
    torch.manual_seed(9)
    dropped = F.dropout(x, 0.3, training=True)
    weight, base = dense_base_weight(layer.base_layer), layer.base_layer
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    s, m = layer.scaling["default"], layer.lora_magnitude_vector["default"]
    scale = m / torch.linalg.norm(weight + s * (b @ a), dim=1)
    expected = base(x) + (scale - 1) * F.linear(dropped, weight) + scale * s * (dropped @ a.T @ b.T)
    assert torch.allclose(ours, expected, atol=1e-5)


@pytest.mark.parametrize("kind", [None, "nf4"])
def test_merge_unmerge_and_merged_weight(kind: str | None) -> None:
    layer = _dora(kind).eval()
    x = torch.randn(6, IN)
    with torch.no_grad():
        unmerged = layer(x)
        weight_before = dense_base_weight(layer.base_layer).clone()
        pure = merged_weight(layer)  # [out, in], the layer untouched
        merge_adapter(layer)
        assert torch.allclose(layer(x), unmerged, atol=1e-5)
        assert torch.allclose(dense_base_weight(layer.base_layer), pure, atol=1e-6)
        assert torch.allclose(merged_weight(layer), pure, atol=1e-6)  # while merged
        unmerge_adapter(layer)
        assert torch.allclose(dense_base_weight(layer.base_layer), weight_before, atol=1e-6)
        assert torch.allclose(layer(x), unmerged, atol=1e-5)
    if kind is not None:
        assert isinstance(layer.base_layer, QuantLinear)  # the very same 4-bit base back


def test_dora_takes_the_reference_paths_of_decoding_and_export(tmp_path) -> None:
    """The batch decoder and the export's fast merge know plain LoRA only: a DoRA adapter
    goes to transformers' generate, is refused by the server's adapter reader, and is
    merged by `merged_weight`; the merged model computes what the adapted one does."""
    from qlora import LoraConfig, QuantConfig, add_lora, quantize_model
    from qlora.adapters.merge import export_merged
    from qlora.export import gguf_model
    from qlora.generate import decode_plan
    from qlora.models.batch_decode import adapter_weights
    from tests.tiny_models import tiny_llama

    quant = QuantConfig(kind="nf4", compute_dtype="float32")  # the merged export's float32
    model = quantize_model(tiny_llama(seed=0, vocab=96), quant)
    add_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0, use_dora=True))
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "magnitude" in name:
                param.add_(torch.randn(param.shape, generator=gen) * 0.1)
    assert "DoRA" in (decode_plan(model).reason or "")
    with pytest.raises(ValueError, match="is DoRA"):
        adapter_weights(model, "default")
    layer = next(m for m in model.modules() if isinstance(m, LoRALinear))
    assert gguf_model._fast_merge(layer, gguf_model._DeltaBuffer()) is None
    export_merged(model, tmp_path / "merged", dtype=torch.float32, verbose=False)
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    ids = torch.randint(0, 96, (2, 7), generator=gen)
    with torch.no_grad():
        diff = (merged(ids).logits - model(ids).logits).abs().max()
    assert diff <= 1e-4, diff


def test_training_a_qdora_adapter_and_loading_it_back(tmp_path) -> None:
    from qlora import LoraConfig, QuantConfig, add_lora, quantize_model
    from qlora.adapters import load_adapter, save_adapter
    from qlora.config import TrainConfig
    from qlora.data import BatchLoader
    from qlora.train import train
    from tests.tiny_models import tiny_llama
    from tests.train.dist_child import VOCAB, examples

    def base() -> nn.Module:
        return quantize_model(tiny_llama(seed=0, vocab=VOCAB), QuantConfig(kind="nf4"))

    model = add_lora(base(), LoraConfig(r=4, alpha=8, dropout=0.1, use_dora=True))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    config = TrainConfig(output_dir=str(tmp_path / "run"), batch_size=4, max_steps=6, lr=5e-3,
                         warmup_steps=0, grad_ckpt=True, malloc_mmap_kb=0)  # fmt: skip
    result = train(model, config, list(BatchLoader(examples(), 4, 0, seed=3)), progress=False)
    losses = [h["loss"] for h in result.history if "loss" in h]
    assert losses[-1] < losses[0]
    moved = [n for n, p in model.named_parameters() if p.requires_grad and "magnitude" in n
             and not torch.equal(p, before[n])]  # fmt: skip
    assert moved  # the magnitudes train
    save_adapter(model, tmp_path / "adapter")
    again = base()
    load_adapter(again, tmp_path / "adapter")
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        assert torch.allclose(again(ids).logits, model(ids).logits, atol=1e-5)
