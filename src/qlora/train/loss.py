"""Causal-LM cross-entropy computed from the final hidden states in chunks.

The usual path, ``logits = head(hidden)`` then ``cross_entropy(logits, labels)``, holds the
[tokens × vocab] logits in float32, their log-softmax, and (in backward) their gradient: for
SmolLM2 (V = 49,152) at 4 × 256 tokens that is three 192 MiB tensors, more than all of the
LoRA activations of the 30 layers together. Here no [tokens × vocab] tensor outlives one
chunk of ``chunk`` rows:

Let h_i ∈ R^d be the hidden state at a position whose next-token label y_i is not -100,
W ∈ R^{V×d} the output head (b its bias, if any), z_i = W h_i + b the logits and
p_i = softmax(z_i). The loss summed over the N labelled positions is

    L = Σ_i [ logsumexp(z_i) − z_{i, y_i} ]

and its gradients, derived by hand (∂ logsumexp(z)/∂z = softmax(z)):

    g_i    := ∂L/∂z_i = p_i − onehot(y_i)          [V]
    ∂L/∂h_i = Wᵀ g_i                               [d]
    ∂L/∂W   = Σ_i g_i h_iᵀ                          [V, d]
    ∂L/∂b   = Σ_i g_i                               [V]

`_ChunkedLinearCrossEntropy` computes, chunk by chunk in forward, the loss *and* these
gradients (the logits of a chunk are formed, used and dropped), and saves only ∂L/∂h
([N, d], the size of the hidden states themselves) and ∂L/∂W, ∂L/∂b when the head trains.
Backward multiplies the saved gradients by the incoming scalar. Positions whose label is
-100 (the prompt, padding) are dropped before the head is applied at all: on instruction
data that skips most of the head's FLOPs too.

With a bfloat16 compute dtype (``quant.compute_dtype``: the frozen base multiplies in bf16,
e.g. on a CPU with AMX or AVX512-BF16) a frozen head does too: its two [C × V × d] products
(the logits, and g W for ∂L/∂h) take bf16 inputs and accumulate in float32 inside the matmul;
the logits are then widened to float32 before the log-sum-exp, the softmax and the loss, as
the QLoRA recipe does on GPUs. A trained head keeps float32 (its gradient accumulates there).

The slow, obvious reference is `reference_cross_entropy` (full logits, ``F.cross_entropy``);
tests compare the two, values and gradients.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qlora.nn.inject import frozen_compute_dtype
from qlora.quant.scratch import scratch

__all__ = ["IGNORE_INDEX", "causal_lm_loss", "chunked_cross_entropy", "reference_cross_entropy"]

IGNORE_INDEX = -100


def _shift(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states [N, d] at positions with a next-token label, and those labels [N]."""
    hidden = hidden[..., :-1, :].reshape(-1, hidden.shape[-1])  # [B·(T-1), d]
    targets = labels[..., 1:].reshape(-1)  # [B·(T-1)]
    keep = targets != IGNORE_INDEX
    return hidden[keep], targets[keep]


def _buffer(
    shape: tuple[int, int], dtype: torch.dtype, slot: str, device: torch.device
) -> torch.Tensor:
    """A [C, V] logits buffer: on the CPU one per thread, reused by every chunk and step
    (`qlora.quant.scratch`: a fresh ~200 MB tensor per chunk would be new memory to fault in
    each time); elsewhere a new tensor."""
    if device.type == "cpu":
        return scratch(shape, dtype, slot)
    return torch.empty(shape, dtype=dtype, device=device)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Sum of cross-entropy of softmax(h Wᵀ + b) against y, gradients formed in forward."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,  # [N, d]
        weight: torch.Tensor,  # [V, d]
        bias: torch.Tensor | None,  # [V]
        targets: torch.Tensor,  # [N]
        chunk: int,
        compute_dtype: torch.dtype,
    ) -> torch.Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        if need_w:  # a trained head: its gradient accumulates in float32
            compute_dtype = torch.float32
        w_head = weight.to(compute_dtype)  # [V, d]
        b32 = bias.float() if bias is not None else None
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(w_head) if need_w else None
        grad_b = torch.zeros_like(b32) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk].to(compute_dtype)  # [C, d]
            y = targets[start : start + chunk]  # [C]
            shape = (h.shape[0], w_head.shape[0])
            logits = _buffer(shape, torch.float32, "logits", h.device)  # [C, V]
            if compute_dtype == torch.float32:
                torch.mm(h, w_head.t(), out=logits)
            else:  # the bf16 product, widened
                narrow = _buffer(shape, compute_dtype, "logits_narrow", h.device)
                logits.copy_(torch.mm(h, w_head.t(), out=narrow))
            if b32 is not None:
                logits += b32
            lse = torch.logsumexp(logits, dim=-1)  # [C]
            total += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
            if need_h or need_w or need_b:
                grad = logits.sub_(lse[:, None]).exp_()  # p = softmax, in place: [C, V]
                grad[torch.arange(len(y), device=y.device), y] -= 1.0  # p - onehot(y)
                if need_h:
                    factor = grad
                    if compute_dtype != torch.float32:  # rounded for the bf16 product
                        narrow = _buffer(shape, compute_dtype, "logits_narrow", h.device)
                        factor = narrow.copy_(grad)
                    grad_rows = factor @ w_head  # [C, d]
                    grad_h[start : start + chunk] = grad_rows.to(hidden.dtype)
                if need_w:
                    grad_w.addmm_(grad.t(), h)
                if need_b:
                    grad_b += grad.sum(0)
            del logits
        ctx.save_for_backward(
            *(t if t is not None else torch.empty(0) for t in (grad_h, grad_w, grad_b))
        )
        ctx.present = (need_h, need_w, need_b)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_h, grad_w, grad_b = ctx.saved_tensors
        need_h, need_w, need_b = ctx.present
        return (
            grad_h * grad_out.to(grad_h.dtype) if need_h else None,
            (grad_w * grad_out).to(ctx.dtypes[0]) if need_w else None,
            (grad_b * grad_out).to(ctx.dtypes[1]) if need_b else None,
            None,
            None,
            None,
        )


def chunked_cross_entropy(
    hidden: torch.Tensor,
    head: nn.Linear,
    labels: torch.Tensor,
    chunk: int = 1024,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy and the number of labelled tokens.

    Args:
        hidden: final hidden states [B, T, d] (after the final norm).
        head: the output projection (weight [V, d], optional bias [V]).
        labels: [B, T] token ids, -100 where no loss is taken; position t's hidden state
            predicts labels[t + 1].
        chunk: rows of the [rows × V] logits formed at once.
        compute_dtype: dtype of a frozen head's two matmuls (bfloat16: see the module
            docstring); the logits are float32 from there on.

    Returns:
        (loss summed over labelled tokens as a float32 scalar, number of labelled tokens).
    """
    h, y = _shift(hidden, labels)
    if h.shape[0] == 0:  # a batch with no labelled token: zero loss, graph kept connected
        return hidden.sum() * 0.0, 0
    loss = _ChunkedLinearCrossEntropy.apply(h, head.weight, head.bias, y, chunk, compute_dtype)
    return loss, int(y.numel())


def reference_cross_entropy(
    hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """The oracle: full float32 logits and ``F.cross_entropy`` (sum), as transformers does."""
    logits = head(hidden).float()  # [B, T, V]
    targets = labels[..., 1:].reshape(-1)
    loss = F.cross_entropy(
        logits[..., :-1, :].reshape(-1, logits.shape[-1]),
        targets,
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss, int((targets != IGNORE_INDEX).sum())


def causal_lm_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    chunk: int = 1024,
) -> tuple[torch.Tensor, int]:
    """Run a transformers causal LM's decoder and take the chunked loss on its output head.

    Returns:
        (summed loss, labelled tokens); divide by the token count of the whole optimizer
        step (all micro-batches) for the mean.
    """
    decoder = getattr(model, model.base_model_prefix)
    out = decoder(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
    )
    hidden = out.last_hidden_state  # [B, T, d]
    head = model.get_output_embeddings()
    for attr in ("logit_scale", "final_logit_softcapping"):
        if getattr(model.config, attr, None) not in (None, 1.0):
            raise NotImplementedError(
                f"{type(model).__name__} transforms its logits ({attr}); the chunked loss "
                "does not implement that yet"
            )
    if isinstance(head, nn.Linear):
        compute = frozen_compute_dtype(model) or torch.float32  # the base's (bf16 or float32)
        return chunked_cross_entropy(hidden, head, labels, chunk, compute)
    return reference_cross_entropy(hidden, head, labels)  # an adapted or unusual head
