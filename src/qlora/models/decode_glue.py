"""DecodeGlue: a decode step's per-layer glue (RMSNorm, attention, SwiGLU) in three C calls.

Between its projections a decoder layer runs ~40 small torch operations per token (RMSNorm as
pow / mean / rsqrt / mul, rotary as flip / mul / add, two ``index_put`` into the KV cache,
the attention mask, ``scaled_dot_product_attention``, SiLU, the residual adds). Each costs a
few microseconds of dispatch around a few hundred flops; on the default model (30 layers)
they were ~10 ms of a 25 ms token on one core, and they do not get faster with more threads.
`qlora.kernels._decode` (``decode.c``) does the same arithmetic in five calls per layer:

* `add_rms_norm`: the residual add and the next RMSNorm in one pass;
* `attend`: rotary on the new token's query and key heads, its key and value into each row's
  cache column, each query head over its row's own columns (no mask);
* `swiglu`: ``silu(gate) * up`` in place;

and, per site of projections sharing an input, `lora_rows`: each row's own adapter's
low-rank update (``qlora.models.lora_rows``' site descriptors), one call for all adapters.

The torch path of `qlora.models.batch_decode.BatchDecoder` is the reference
(``BatchDecoder(..., c_glue=False)``): the same products in the same order where that is
cheap (RMSNorm's, rotary's), float32 summation order elsewhere, and a 1-ulp ``exp``: logits
agree to ~1e-6 relative and greedy tokens are equal (tests/models/test_decode_glue.py).

Only float32 CPU tensors are taken; every pointer handed to C is checked here (dtype,
device, contiguity, size), so a wrong call is a ValueError, never a stray write.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType

import torch

from qlora.kernels import c_extension

__all__ = ["DecodeGlue"]


def _pointer(name: str, tensor: torch.Tensor, numel: int | None = None) -> int:
    """``tensor``'s data pointer once it is float32 (or int64 lengths), CPU and contiguous."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise ValueError(f"{name} must be a contiguous CPU tensor, got {tensor.device} "
                         f"strides {tensor.stride()}")  # fmt: skip
    if numel is not None and tensor.numel() != numel:
        raise ValueError(f"{name} has {tensor.numel()} elements, expected {numel}")
    return tensor.data_ptr()


def _float32(name: str, tensor: torch.Tensor, numel: int | None = None) -> int:
    if tensor.dtype != torch.float32:
        raise ValueError(f"{name} must be float32, got {tensor.dtype}")
    return _pointer(name, tensor, numel)


class DecodeGlue:
    """The ``_decode`` extension's calls on tensors. Build with `DecodeGlue.create` (None when
    the extension is not built or kernels are disabled)."""

    def __init__(self, extension: ModuleType) -> None:
        self._c = extension

    @classmethod
    def create(cls) -> DecodeGlue | None:
        extension = c_extension("decode")
        return None if extension is None else cls(extension)

    def add_rms_norm(
        self,
        hidden: torch.Tensor,
        delta: torch.Tensor | None,
        weight: torch.Tensor,
        eps: float,
    ) -> torch.Tensor:
        """``hidden += delta`` in place (unless None), then RMSNorm(hidden) · weight, new [n, h]."""
        n, h = hidden.shape
        out = torch.empty_like(hidden)
        self._c.add_rms_norm(
            _float32("hidden", hidden),
            0 if delta is None else _float32("delta", delta, n * h),
            _float32("norm weight", weight, h),
            out.data_ptr(), n, h, eps,
        )  # fmt: skip
        return out

    def attend(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        positions: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """One new token per row: queries [n, heads·D], keys/values [n, kv_heads·D] (rotary
        applied in place to queries and keys), the caches [slots, kv_heads, capacity, D]
        (row r's key and value written at column positions[r]), cos/sin [n, D]. Returns the
        attention output [n, heads·D] over each row's columns 0..positions[r]."""
        slots, kv_heads, capacity, dim = key_cache.shape
        n = queries.shape[0]
        heads = queries.numel() // max(n * dim, 1)
        if positions.dtype != torch.int64 or positions.shape != (n,):
            raise ValueError(f"positions must be int64 [{n}], got {positions.dtype} "
                             f"{tuple(positions.shape)}")  # fmt: skip
        if n > slots or value_cache.shape != key_cache.shape:
            raise ValueError(f"{n} rows for caches of {tuple(key_cache.shape)} and "
                             f"{tuple(value_cache.shape)}")  # fmt: skip
        out = torch.empty(n, heads * dim, dtype=torch.float32)
        self._c.attend(
            _float32("queries", queries, n * heads * dim),
            _float32("keys", keys, n * kv_heads * dim),
            _float32("values", values, n * kv_heads * dim),
            _float32("key cache", key_cache),
            _float32("value cache", value_cache),
            _pointer("positions", positions),
            _float32("cos", cos, n * dim),
            _float32("sin", sin, n * dim),
            out.data_ptr(), n, heads, kv_heads, dim, capacity, scale, torch.get_num_threads(),
        )  # fmt: skip
        return out

    def swiglu(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """``silu(gate) * up`` written into ``gate``, which is returned."""
        self._c.swiglu(_float32("gate", gate), _float32("up", up, gate.numel()), gate.numel())
        return gate

    def lora_rows(
        self, x: torch.Tensor, table: torch.Tensor, site: int, outputs: Sequence[torch.Tensor]
    ) -> None:
        """Adds each row's adapter's update of ``site`` to ``outputs`` in place: x [n, in],
        ``table`` [sites, n] from `qlora.models.lora_rows.site_table`, outputs (the site's
        projections, at most 3) [n, out_j]."""
        n, features = x.shape
        if table.dtype != torch.int64 or table.dim() != 2 or table.shape[1] != n:
            raise ValueError(f"the site table must be int64 [sites, {n}], got {table.dtype} "
                             f"{tuple(table.shape)}")  # fmt: skip
        if not 0 <= site < table.shape[0] or not 1 <= len(outputs) <= 3:
            raise ValueError(f"site {site} of {table.shape[0]}, {len(outputs)} outputs (1 to 3)")
        pointers, widths = [0, 0, 0], [0, 0, 0]
        for j, out in enumerate(outputs):
            if out.dim() != 2 or out.shape[0] != n:
                raise ValueError(f"output {j} is {tuple(out.shape)}, expected [{n}, out]")
            pointers[j], widths[j] = _float32(f"output {j}", out), out.shape[1]
        self._c.lora_rows(
            _float32("x", x), n, features, _pointer("site table", table) + site * n * 8,
            *pointers, *widths, torch.get_num_threads(),
        )  # fmt: skip
