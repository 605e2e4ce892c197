"""QuantLinear: a frozen k-bit Linear layer.

The weight lives only in its quantized form (a `QuantState`: packed codes + block scales).
Each forward dequantizes it to ``compute_dtype``, multiplies, and lets the dequantized copy
go; backward dequantizes again instead of keeping it alive between the passes. That costs a
second dequantize per step but keeps activation memory free of full-precision weights - the
whole point of QLoRA.

The state dict uses bitsandbytes' ``Linear4bit`` keys and bytes, so a pre-quantized
bitsandbytes checkpoint loads with `load_state_dict` and ours loads in bitsandbytes.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from qlora.dtypes import torch_dtype
from qlora.hardware import choose_compute_dtype
from qlora.quant.blockwise import quantize
from qlora.quant.dequant import dequantize
from qlora.quant.matvec import matvec_applies, quantized_matmul_few
from qlora.quant.scratch import dequantize_scratch
from qlora.quant.state import QuantState

__all__ = ["QuantLinear", "dequantize_for_matmul", "fast_decoding", "quantized_matmul"]

# Whether a CPU forward without autograd may take the fused few-row kernel. Off by default, so
# that a plain forward stays bit-identical to dequantize-then-matmul (bitsandbytes' logits);
# generation turns it on. A ContextVar: per thread and per asyncio task, no global switch.
_FAST_DECODING: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "qlora_fast_decoding", default=False
)


@contextlib.contextmanager
def fast_decoding(enabled: bool = True) -> Iterator[None]:
    """Within this block, CPU QuantLinear forwards of few rows without autograd use the fused
    dequantize + matmul kernel (`qlora.quant.matvec`): the same weights, float32 accumulation
    in another order, so logits agree to float32 rounding rather than bit for bit."""
    token = _FAST_DECODING.set(enabled)
    try:
        yield
    finally:
        _FAST_DECODING.reset(token)


def fast_decoding_applies(x: torch.Tensor, state: QuantState) -> bool:
    """Whether this forward takes the fused CPU kernel (inside `fast_decoding`, no autograd)."""
    return _FAST_DECODING.get() and not torch.is_grad_enabled() and matvec_applies(x, state)


def _state_tensors(state: QuantState) -> tuple[torch.Tensor, ...]:
    tensors = (state.packed, state.absmax, state.code)
    if state.nested is not None:
        tensors += (state.nested.absmax, state.nested.code, state.nested.offset)
    return tensors


def _state_from_tensors(template: QuantState, tensors: tuple[torch.Tensor, ...]) -> QuantState:
    nested = None
    if template.nested is not None:
        nested = replace(template.nested, absmax=tensors[3], code=tensors[4], offset=tensors[5])
    return replace(template, packed=tensors[0], absmax=tensors[1], code=tensors[2], nested=nested)


def dequantize_for_matmul(state: QuantState, dtype: torch.dtype) -> torch.Tensor:
    """The weight [out, in] for one matmul; on the CPU in a reused per-thread buffer.

    The result is overwritten by the next call on this thread: consume it right away.
    """
    if state.device.type == "cpu":
        return dequantize(state, dtype=dtype, out=dequantize_scratch(state.shape, dtype))
    return dequantize(state, dtype=dtype)


class _QuantMatmul(torch.autograd.Function):
    """y = x Wᵀ with W frozen and stored quantized.

    Forward: W = deq(state) in the compute dtype; y = x Wᵀ.
    Backward: only the input needs a gradient. With L the loss and g = ∂L/∂y [.., out],
        ∂L/∂x = g W            (W dequantized again: [out, in])
        ∂L/∂W is never formed  (the weight is frozen), so x itself need not be saved.
    Saved for backward: the packed codes and scales only (already resident as buffers), never
    the dequantized [out, in] weight.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, state: QuantState) -> torch.Tensor:
        ctx.save_for_backward(*_state_tensors(state))
        ctx.template = state
        weight = dequantize_for_matmul(state, x.dtype)  # [out, in]
        return x @ weight.t()

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        state = _state_from_tensors(ctx.template, ctx.saved_tensors)
        weight = dequantize_for_matmul(state, grad_out.dtype)  # [out, in]
        return grad_out @ weight, None


def quantized_matmul(x: torch.Tensor, state: QuantState) -> torch.Tensor:
    """x [.., in] @ deq(state)ᵀ -> [.., out], differentiable in x only."""
    return _QuantMatmul.apply(x, state)


def _fused_decode_applies(x: torch.Tensor, in_features: int) -> bool:
    from qlora.kernels import triton_enabled
    from qlora.kernels.triton_matmul import FUSED_MAX_TOKENS

    if torch.is_grad_enabled() and x.requires_grad:
        return False
    return x.numel() // max(in_features, 1) <= FUSED_MAX_TOKENS and triton_enabled()


def _fused_decode(x: torch.Tensor, state: QuantState) -> torch.Tensor:
    """x [.., in] @ deq(state)ᵀ by the fused Triton kernel (no dequantized copy)."""
    from qlora.kernels.triton_matmul import quantized_matmul_triton
    from qlora.quant.blockwise import dequantize_absmax

    rows = x.reshape(-1, x.shape[-1]).contiguous()  # [M, in]
    out = quantized_matmul_triton(
        rows,
        state.packed.contiguous(),
        dequantize_absmax(state).float().contiguous(),
        state.code.float().contiguous(),
        int(state.shape[0]),
        int(state.shape[1]),
        state.blocksize,
        state.bits,
    )  # [M, out]
    return out.view(*x.shape[:-1], out.shape[-1])


class QuantLinear(nn.Module):
    """A Linear layer whose weight is frozen and stored blockwise-quantized.

    Args:
        state: the quantized weight [out, in].
        bias: optional full-precision bias [out] (kept frozen by default).
        compute_dtype: dtype for the matmul; inputs are cast to it, outputs cast back
            ("auto": `qlora.hardware.choose_compute_dtype` for the state's device).
    """

    def __init__(
        self,
        state: QuantState,
        bias: torch.Tensor | None = None,
        compute_dtype: torch.dtype | str = torch.float32,
    ) -> None:
        super().__init__()
        if len(state.shape) != 2:
            raise ValueError(f"QuantLinear needs a 2-D weight, got shape {tuple(state.shape)}")
        self.out_features, self.in_features = int(state.shape[0]), int(state.shape[1])
        if compute_dtype == "auto":  # bf16 where the hardware multiplies it natively
            compute_dtype = choose_compute_dtype(state.packed.device).dtype
        elif isinstance(compute_dtype, str):
            compute_dtype = torch_dtype(compute_dtype)
        self.compute_dtype = compute_dtype
        self.bias = (
            nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        )
        self._set_state(state)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        kind: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | str | None = None,
    ) -> QuantLinear:
        """Quantize an ``nn.Linear`` (weight [out, in]); its bias is kept in full precision."""
        state = quantize(linear.weight.data, kind, blocksize, double_quant)
        dtype = compute_dtype if compute_dtype is not None else torch.float32
        return cls(state, linear.bias.data if linear.bias is not None else None, dtype)

    # The quantized tensors are buffers so that .to(device) moves them; the QuantState is
    # rebuilt from the buffers on demand (cheap: no copies).
    def _set_state(self, state: QuantState) -> None:
        self._meta = {
            "kind": state.kind,
            "shape": state.shape,
            "dtype": state.dtype,
            "blocksize": state.blocksize,
            "nested_blocksize": state.nested.blocksize if state.nested else None,
        }
        for name in list(self._buffers):
            del self._buffers[name]
        for name in self.SHARDABLE:  # held as parameters for FSDP2 (storage_as_parameters)
            self._parameters.pop(name, None)
        self.register_buffer("weight", state.packed, persistent=False)
        self.register_buffer("weight_absmax", state.absmax, persistent=False)
        self.register_buffer("weight_code", state.code, persistent=False)
        if state.nested is not None:
            self.register_buffer("weight_nested_absmax", state.nested.absmax, persistent=False)
            self.register_buffer("weight_nested_code", state.nested.code, persistent=False)
            self.register_buffer("weight_nested_offset", state.nested.offset, persistent=False)

    # The per-weight tensors (the packed codes, the block scales, the nested scales): what
    # grows with the layer. The codebooks and the nested offset are small and stay buffers.
    SHARDABLE = ("weight", "weight_absmax", "weight_nested_absmax")

    def storage_as_parameters(self) -> None:
        """Hold the packed codes and scales as frozen ``nn.Parameter``s instead of buffers.

        For FSDP2 (`qlora.train.parallel`), which shards and all-gathers parameters only: the
        tensors keep their dtype (uint8 codes stay uint8; FSDP2 gathers a group of mixed
        dtypes as bytes), nothing is copied or converted, and ``quant_state`` reads them by
        name as before, so it sees whatever tensor FSDP2 has put in place.
        """
        for name in self.SHARDABLE:
            tensor = self._buffers.pop(name, None)
            if tensor is not None:
                self.register_parameter(name, nn.Parameter(tensor, requires_grad=False))

    @property
    def quant_state(self) -> QuantState:
        from qlora.quant.state import NestedState

        meta = self._meta
        nested = None
        if meta["nested_blocksize"] is not None:
            nested = NestedState(
                absmax=self.weight_nested_absmax,
                code=self.weight_nested_code,
                offset=self.weight_nested_offset,
                blocksize=meta["nested_blocksize"],
            )
        return QuantState(
            kind=meta["kind"],
            packed=self.weight,
            absmax=self.weight_absmax,
            shape=meta["shape"],
            dtype=meta["dtype"],
            blocksize=meta["blocksize"],
            code=self.weight_code,
            nested=nested,
        )

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight exactly as forward uses it: [out, in] in ``dtype`` (default compute)."""
        return dequantize(self.quant_state, dtype=dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [.., in] -> [.., out] (in x's dtype).

        A few tokens without autograd (decoding) take a fused kernel that reads the k-bit codes
        once instead of writing and re-reading a dequantized copy: Triton on CUDA, and on the
        CPU inside `fast_decoding` the C kernel of `qlora.quant.matvec` (float32
        accumulation; equal to dequantize-then-matmul in float32 up to summation order, also
        under a bfloat16 compute dtype, which only the many-row matmuls use).
        """
        state = self.quant_state
        if x.is_cuda and not state.is_gguf and _fused_decode_applies(x, self.in_features):
            out = _fused_decode(x.to(self.compute_dtype), state)
        elif fast_decoding_applies(x, state):  # CPU decoding: no dequantized copy
            # Few rows are memory-bound: the kernel reads the codes once and accumulates in
            # float32 whatever compute_dtype says, so float32 inputs are not rounded to bf16.
            rows = x if x.dtype == torch.float32 else x.to(self.compute_dtype)
            out = quantized_matmul_few(rows, state).to(rows.dtype)
        else:
            out = quantized_matmul(x.to(self.compute_dtype), state)
        out = out.to(x.dtype)
        if self.bias is not None:  # added at the activations' precision, not bf16's
            out = out + self.bias.to(out.dtype)
        return out

    def extra_repr(self) -> str:
        meta = self._meta
        dq = ", double_quant" if meta["nested_blocksize"] else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, kind={meta['kind']}, blocksize={meta['blocksize']}"
            f"{dq}, compute_dtype={str(self.compute_dtype).removeprefix('torch.')}"
        )

    # -- bitsandbytes-compatible state dict -------------------------------------------------

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)  # bias
        for key, value in self.quant_state.to_state_dict(prefix + "weight").items():
            destination[key] = value if keep_vars else value.detach()

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        weight_key = prefix + "weight"
        own = {
            k: v for k, v in state_dict.items() if k == weight_key or k.startswith(weight_key + ".")
        }
        if weight_key not in own:
            missing_keys.append(weight_key)
        else:
            try:
                state = QuantState.from_state_dict(
                    own, weight_key, where=prefix.rstrip(".") or "QuantLinear"
                )
            except (KeyError, ValueError) as err:
                error_msgs.append(str(err))
            else:
                if tuple(state.shape) != (self.out_features, self.in_features):
                    error_msgs.append(
                        f"{weight_key}: checkpoint shape {tuple(state.shape)} does not match "
                        f"the layer's {(self.out_features, self.in_features)}"
                    )
                else:
                    self._set_state(state.to(self.weight.device))
        bias_key = prefix + "bias"
        if self.bias is not None:
            if bias_key in state_dict:
                with torch.no_grad():
                    self.bias.copy_(state_dict[bias_key])
            else:
                missing_keys.append(bias_key)
        elif bias_key in state_dict and strict:
            unexpected_keys.append(bias_key)
