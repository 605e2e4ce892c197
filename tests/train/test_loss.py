"""The chunked loss against full-logits cross-entropy: values and hand-derived gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qlora.train.loss import causal_lm_loss, chunked_cross_entropy, reference_cross_entropy
from tests.tiny_models import tiny_llama


def _case(bias: bool, head_grad: bool, dtype: torch.dtype = torch.float32):
    hidden = torch.randn(3, 11, 16, dtype=dtype, requires_grad=True)
    head = nn.Linear(16, 50, bias=bias)
    head.requires_grad_(head_grad)
    labels = torch.randint(0, 50, (3, 11))
    labels[0, :4] = -100  # a prompt
    labels[2, 7:] = -100  # padding
    return hidden, head, labels


def _grads(hidden: torch.Tensor, head: nn.Linear, loss: torch.Tensor) -> list[torch.Tensor]:
    params = [hidden] + [p for p in head.parameters() if p.requires_grad]
    return list(torch.autograd.grad(loss * 0.7, params))


@pytest.mark.parametrize("chunk", [1, 4, 1000])
@pytest.mark.parametrize(("bias", "head_grad"), [(False, False), (True, True), (False, True)])
def test_matches_full_logits_reference(chunk: int, bias: bool, head_grad: bool) -> None:
    hidden, head, labels = _case(bias, head_grad)
    loss, n = chunked_cross_entropy(hidden, head, labels, chunk)
    ref, n_ref = reference_cross_entropy(hidden, head, labels)
    assert n == n_ref == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-5)
    for ours, expected in zip(_grads(hidden, head, loss), _grads(hidden, head, ref), strict=True):
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


def test_bfloat16_hidden_keeps_its_dtype_and_is_close() -> None:
    hidden, head, labels = _case(False, False, torch.bfloat16)
    loss, _ = chunked_cross_entropy(hidden, head.bfloat16(), labels, 5)
    ref, _ = reference_cross_entropy(hidden, head, labels)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-3, atol=1e-3)
    (grad,) = torch.autograd.grad(loss, hidden)
    assert grad.dtype == torch.bfloat16


def test_no_labelled_token_gives_zero_and_a_gradient() -> None:
    hidden, head, labels = _case(False, False)
    loss, n = chunked_cross_entropy(hidden, head, torch.full_like(labels, -100))
    assert n == 0 and loss.item() == 0.0
    loss.backward()
    assert torch.equal(hidden.grad, torch.zeros_like(hidden))


def test_model_level_loss_equals_transformers_loss() -> None:
    model = tiny_llama(vocab=96).train()
    ids = torch.randint(0, 96, (2, 10))
    labels = ids.clone()
    labels[:, :3] = -100
    ours, n = causal_lm_loss(model, ids, labels, chunk=7)
    theirs = model(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(ours / n, theirs, rtol=1e-5, atol=1e-6)
    ours.backward()
    ours_grad = model.model.layers[0].mlp.up_proj.weight.grad.clone()
    model.zero_grad()
    (theirs * n).backward()
    torch.testing.assert_close(ours_grad, model.model.layers[0].mlp.up_proj.weight.grad)
