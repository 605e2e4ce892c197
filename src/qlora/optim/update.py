"""The AdamW update on a slice of a parameter, with fp32 or 8-bit moments.

`adamw_` is `torch.optim.AdamW`'s single-tensor update (the path PyTorch takes on CPU) op for
op: the same in-place ops in the same order, so on one slice or on a whole tensor it gives
the same bits (element-wise ops do not depend on how a tensor is cut). Everything else here
cuts parameters into chunks so that temporaries stay small whatever the parameter's size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qlora.kernels import c_extension
from qlora.optim.state8bit import BLOCK, dequantize_state, fused_kernel_args, quantize_state

__all__ = ["Hyper", "adamw_", "update_fp32_state", "update_quantized_state"]

CHUNK = 1 << 18  # elements per chunk: a multiple of BLOCK; 1 MiB per fp32 temporary


@dataclass(frozen=True)
class Hyper:
    """One parameter group's AdamW settings at this step."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float


def adamw_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int,
    h: Hyper,
) -> None:
    """One decoupled-weight-decay Adam step, in place. All tensors [n], same dtype.

    m ← m + (1 − β1)(g − m);  v ← β2·v + (1 − β2)·g²;
    p ← p·(1 − lr·λ) − lr/(1 − β1ᵗ) · m / (√v / √(1 − β2ᵗ) + ε)
    """
    if h.weight_decay != 0:
        param.mul_(1 - h.lr * h.weight_decay)
    exp_avg.lerp_(grad, 1 - h.beta1)
    exp_avg_sq.mul_(h.beta2).addcmul_(grad, grad, value=1 - h.beta2)
    bias_correction1 = 1 - h.beta1**step
    bias_correction2 = 1 - h.beta2**step
    step_size = h.lr / bias_correction1
    denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(h.eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)


def _param_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int,
    h: Hyper,
) -> None:
    """`adamw_` with fp32 moments for a parameter of any float dtype (math in fp32)."""
    if param.dtype == torch.float32:
        adamw_(param, grad.float(), exp_avg, exp_avg_sq, step, h)
        return
    wide = param.float()
    adamw_(wide, grad.float(), exp_avg, exp_avg_sq, step, h)
    param.copy_(wide)


def update_fp32_state(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int,
    h: Hyper,
) -> None:
    """AdamW on flat [n] slices with fp32 moments, chunk by chunk."""
    n = param.numel()
    for s in range(0, n, CHUNK):
        e = min(n, s + CHUNK)
        _param_update(param[s:e], grad[s:e], exp_avg[s:e], exp_avg_sq[s:e], step, h)


def update_quantized_state(
    param: torch.Tensor,
    grad: torch.Tensor,
    codes_m: torch.Tensor,
    codes_v: torch.Tensor,
    absmax_m: torch.Tensor,
    absmax_v: torch.Tensor,
    step: int,
    h: Hyper,
    scratch: torch.Tensor,
    *,
    reference: bool = False,
) -> None:
    """AdamW on flat [n] slices with 8-bit moments: per chunk, dequantize → update → requantize.

    On a CPU with the C extension, float32 parameters take one fused pass per 256-value block
    (``adamw8bit_step`` in cpu.c: the same float operations, no temporaries, one pass over
    memory instead of ~15); otherwise, or with ``reference=True``, chunks of PyTorch ops. The
    two differ only where torch.sqrt is not correctly rounded (MKL builds; the kernel's is),
    so a moment may land one code apart (tested).

    Args:
        param, grad: [n] (the slice must start on a 256-element block boundary).
        codes_m, codes_v: uint8 [n]; absmax_m, absmax_v: float32 [ceil(n / 256)].
        scratch: float32 [2, CHUNK] on the parameter's device, reused across calls.
    """
    n = param.numel()
    kernel = c_extension("cpu") if param.device.type == "cpu" and not reference else None
    if (
        kernel is not None
        and hasattr(kernel, "adamw8bit_step")
        and param.dtype == grad.dtype == torch.float32
        and param.is_contiguous()
        and grad.is_contiguous()
    ):
        bias_correction1 = 1 - h.beta1**step
        kernel.adamw8bit_step(
            param.data_ptr(), grad.data_ptr(), codes_m.data_ptr(), codes_v.data_ptr(),
            absmax_m.data_ptr(), absmax_v.data_ptr(), n, *fused_kernel_args(),
            int(h.weight_decay != 0), 1 - h.lr * h.weight_decay, 1 - h.beta1, h.beta2,
            1 - h.beta2, (1 - h.beta2**step) ** 0.5, h.eps, -(h.lr / bias_correction1),
            torch.get_num_threads(),
        )  # fmt: skip
        return
    for s in range(0, n, CHUNK):
        e = min(n, s + CHUNK)
        bs, be = s // BLOCK, -(-e // BLOCK)
        m = dequantize_state(codes_m[s:e], absmax_m[bs:be], True, scratch[0, : e - s])
        v = dequantize_state(codes_v[s:e], absmax_v[bs:be], False, scratch[1, : e - s])
        _param_update(param[s:e], grad[s:e], m, v, step, h)
        quantize_state(m, True, codes_m[s:e], absmax_m[bs:be])
        quantize_state(v, False, codes_v[s:e], absmax_v[bs:be])
