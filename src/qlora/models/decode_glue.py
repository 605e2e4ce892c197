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

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType

import torch

from qlora.kernels import c_extension

__all__ = ["LAYER_FIELDS", "DecodeGlue", "LayerShape", "float_bits"]


_FLOAT32 = torch.float32


def _bad(name: str, tensor: torch.Tensor, numel: int | None, dtype: torch.dtype) -> ValueError:
    """What is wrong with ``tensor`` for the C side (one line)."""
    if tensor.dtype != dtype:
        return ValueError(f"{name} must be {dtype}, got {tensor.dtype}")
    if not tensor.is_cpu or not tensor.is_contiguous():
        return ValueError(f"{name} must be a contiguous CPU tensor, got {tensor.device} "
                          f"strides {tensor.stride()}")  # fmt: skip
    return ValueError(f"{name} has {tensor.numel()} elements, expected {numel}")


def _pointer(name: str, tensor: torch.Tensor, numel: int | None, dtype: torch.dtype) -> int:
    """``tensor``'s data pointer once it is ``dtype``, on the CPU, contiguous and (unless
    None) ``numel`` long. (Called ~10 times per layer per token: kept to the few attribute
    reads it needs.)"""
    if (
        tensor.dtype is dtype
        and tensor.is_cpu
        and tensor.is_contiguous()
        and (numel is None or tensor.numel() == numel)
    ):
        return tensor.data_ptr()
    raise _bad(name, tensor, numel, dtype)


def _float32(name: str, tensor: torch.Tensor, numel: int | None = None) -> int:
    return _pointer(name, tensor, numel, _FLOAT32)


class DecodeGlue:
    """The ``_decode`` extension's calls on tensors. Build with `DecodeGlue.create` (None when
    the extension is not built or kernels are disabled)."""

    def __init__(self, extension: ModuleType) -> None:
        self._c = extension
        self._threads = torch.get_num_threads()  # read once: a glue lives for one step

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
            _pointer("positions", positions, n, torch.int64),
            _float32("cos", cos, n * dim),
            _float32("sin", sin, n * dim),
            out.data_ptr(), n, heads, kv_heads, dim, capacity, scale, self._threads,
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
        if table.dim() != 2 or table.shape[1] != n or not 0 <= site < table.shape[0]:
            raise ValueError(f"site {site} of a site table {tuple(table.shape)} for {n} rows")
        if not 1 <= len(outputs) <= 3:
            raise ValueError(f"a site has 1 to 3 outputs, got {len(outputs)}")
        pointers, widths = [0, 0, 0], [0, 0, 0]
        for j, out in enumerate(outputs):
            width = out.shape[-1]
            pointers[j], widths[j] = _float32(f"output {j}", out, n * width), width
        self._c.lora_rows(
            _float32("x", x), n, features,
            _pointer("site table", table, None, torch.int64) + site * n * 8,
            *pointers, *widths, self._threads,
        )  # fmt: skip

    def layers(
        self,
        description: torch.Tensor,
        hidden: torch.Tensor,
        shape: LayerShape,
        positions: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        caches: torch.Tensor,
        table: torch.Tensor | None,
        final_norm: torch.Tensor,
        final_eps: float,
    ) -> torch.Tensor:
        """Every decoder layer of a step in one call (the C decode loop): ``description``
        [layers, 95] int64 (`layer_description`), hidden [n, H] (the residual stream,
        updated in place), positions [n], cos/sin [n, D], ``caches`` [layers, 2] the
        addresses of each layer's key and value cache [slots, kv_heads, capacity, D],
        ``table`` [layers·4, n] (`qlora.models.lora_rows.site_table`) or None. Returns the
        final norm's output [n, H]: what the output head reads."""
        n, size = hidden.shape
        count = description.shape[0]
        if description.shape != (count, LAYER_FIELDS) or caches.shape != (count, 2):
            raise ValueError(f"a layer description [{count}, {LAYER_FIELDS}] and caches "
                             f"[{count}, 2], got {tuple(description.shape)} and "
                             f"{tuple(caches.shape)}")  # fmt: skip
        if table is not None and table.shape != (count * 4, n):
            raise ValueError(f"the site table must be [{count * 4}, {n}], got {tuple(table.shape)}")
        if size != shape.hidden:
            raise ValueError(f"hidden is [{n}, {size}], the layers' width is {shape.hidden}")
        out = torch.empty_like(hidden)
        dim = shape.head_dim
        self._c.layers(
            _pointer("layer description", description, None, torch.int64), count,
            _float32("hidden", hidden), n, size, shape.intermediate, shape.heads,
            shape.kv_heads, dim, shape.capacity,
            _pointer("positions", positions, n, torch.int64),
            _float32("cos", cos, n * dim), _float32("sin", sin, n * dim),
            _pointer("caches", caches, None, torch.int64),
            0 if table is None else _pointer("site table", table, None, torch.int64),
            shape.scale, _float32("final norm weight", final_norm, size), final_eps,
            out.data_ptr(), self._threads,
        )  # fmt: skip
        return out


# int64 per layer in a layer description: 2 norm weights, their 2 eps (float32 bits), then
# per projection (q, k, v, o, gate, up, down) the 12 `MatvecPlan.fields` and a bias address.
LAYER_FIELDS = 4 + 7 * 13


@dataclass(frozen=True)
class LayerShape:
    """The sizes the C decode loop checks every projection against, and the cache's width."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    capacity: int
    scale: float


def float_bits(value: float) -> int:
    """``value`` as float32, its bits as an integer (a field of a layer description)."""
    return struct.unpack("<I", struct.pack("<f", value))[0]
