"""QLoRA layers under gradient checkpointing and a bfloat16 compute dtype."""

import pytest
import torch

import qlora
from tests.tiny_models import tiny_llama as build_tiny_llama

transformers = pytest.importorskip("transformers")


def tiny_llama(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    return build_tiny_llama().train().to(dtype)


def adapter_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_gradient_checkpointing_gives_identical_adapter_gradients() -> None:
    model = qlora.quantize_model(tiny_llama(), qlora.QuantConfig(kind="nf4"))
    model = qlora.add_lora(model, qlora.LoraConfig(r=8, alpha=16, dropout=0.0))
    model.train()
    ids = torch.randint(0, 128, (2, 16))
    loss = model(ids, labels=ids).loss
    loss.backward()
    plain = adapter_grads(model)
    model.zero_grad()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed_loss = model(ids, labels=ids).loss
    checkpointed_loss.backward()
    assert checkpointed_loss.item() == loss.item()
    for name, grad in adapter_grads(model).items():
        torch.testing.assert_close(grad, plain[name], rtol=0, atol=0, msg=name)


def test_bfloat16_compute_trains() -> None:
    model = tiny_llama(torch.bfloat16)
    model = qlora.quantize_model(model, qlora.QuantConfig(kind="nf4", compute_dtype="bfloat16"))
    model = qlora.add_lora(model, qlora.LoraConfig(r=8))
    ids = torch.randint(0, 128, (2, 16))
    loss = model(ids, labels=ids).loss
    loss.backward()
    grads = adapter_grads(model)
    assert grads and all(torch.isfinite(g).all() for g in grads.values())
    assert any(g.abs().sum() > 0 for g in grads.values())
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)
