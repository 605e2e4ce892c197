"""QuantState: everything needed to read a blockwise-quantized tensor back.

The layout follows bitsandbytes' 4-bit format so that its checkpoints load directly and ours
load in bitsandbytes:

    packed   uint8 [ceil(numel * bits / 8)]   codes, first element in the HIGH bits of a byte
    absmax   float32 [nblocks]                one scale per block of `blocksize` elements
             or uint8 [nblocks] with double quantization (codes into the dynamic 8-bit map)
    nested   (double quantization only)
      absmax float32 [ceil(nblocks / 256)]    scales of the absmax codes
      code   float32 [256]                    the signed dynamic map
      offset float32 []                       mean of the fp32 absmax, subtracted before
    code     float32 [2^bits]                 the codebook (bitsandbytes: `quant_map`)

In a Linear4bit state dict these appear as ``weight`` (packed, shape [nbytes, 1]),
``weight.absmax``, ``weight.quant_map``, ``weight.nested_absmax``, ``weight.nested_quant_map`` and
``weight.quant_state.bitsandbytes__nf4`` - a JSON blob (as uint8) holding the non-tensor fields.

A GGUF block kind (``q4_0``, ``q4_1``, ``q8_0``, the K-quants: `qlora.quant.gguf_blocks`) uses
the same container for a GGUF file's own bytes, kept as they are (``quant.kind: gguf``):

    packed   uint8 [rows * row_bytes]          the tensor's blocks exactly as the file has them
                                               (scales inside each block, llama.cpp's layout)
    absmax   float32 [0], code float32 [0]     unused: each block carries its own scales
    blocksize                                  elements per block (32, or 256 for K-quants)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace

import torch

from qlora.dtypes import torch_dtype
from qlora.quant.codebooks import BITS, BNB_KINDS, KINDS
from qlora.quant.gguf_blocks import GGUF_BLOCK_KINDS, block_shape, row_bytes

__all__ = ["NestedState", "QuantState"]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class NestedState:
    """Double quantization of the absmax values (blockwise, signed dynamic 8-bit map)."""

    absmax: torch.Tensor  # float32 [ceil(nblocks / blocksize)]
    code: torch.Tensor  # float32 [256]
    offset: torch.Tensor  # float32 []
    blocksize: int = 256


@dataclass(frozen=True)
class QuantState:
    """A blockwise-quantized tensor. Create with `qlora.quant.quantize`."""

    kind: str
    packed: torch.Tensor  # uint8 [nbytes]
    absmax: torch.Tensor  # float32 [nblocks], or uint8 [nblocks] if nested
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    code: torch.Tensor  # float32 [2^bits]
    nested: NestedState | None = None

    @classmethod
    def from_gguf_blocks(
        cls,
        blocks: torch.Tensor,
        kind: str,
        shape: tuple[int, ...] | torch.Size,
        dtype: torch.dtype = torch.float32,
    ) -> QuantState:
        """A GGUF tensor's own blocks as a state: ``blocks`` uint8 [rows, row_bytes] (any
        shape holding that many bytes), ``shape`` the tensor's [rows, columns] in HF order."""
        if kind not in GGUF_BLOCK_KINDS:
            raise ValueError(f"unknown GGUF block kind {kind!r}; choose one of {GGUF_BLOCK_KINDS}")
        shape = torch.Size(shape)
        expected = math.prod(shape[:-1]) * row_bytes(kind, shape[-1])
        if blocks.dtype != torch.uint8 or blocks.numel() != expected:
            raise ValueError(
                f"{kind} blocks of a {tuple(shape)} tensor must be {expected} uint8 bytes; got "
                f"{blocks.numel()} {blocks.dtype}"
            )
        empty = torch.empty(0, dtype=torch.float32, device=blocks.device)
        return cls(
            kind=kind,
            packed=blocks.reshape(-1),
            absmax=empty,
            shape=shape,
            dtype=dtype,
            blocksize=block_shape(kind)[0],
            code=empty,
        )

    @property
    def is_gguf(self) -> bool:
        """Whether this holds a GGUF file's own blocks (rather than codes into a codebook)."""
        return self.kind in GGUF_BLOCK_KINDS

    @property
    def bits(self) -> int:
        """Bits per code of a codebook kind (for GGUF blocks: see `bits_per_parameter`)."""
        if self.is_gguf:
            raise ValueError(f"{self.kind} blocks have no fixed code width; use bits_per_parameter")
        return BITS[self.kind]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nblocks(self) -> int:
        return -(-self.numel // self.blocksize)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def storage_bytes(self) -> int:
        """Bytes held by every tensor of the state (codes, scales, nested scales, codebooks)."""
        tensors = [self.packed, self.absmax, self.code]
        if self.nested is not None:
            tensors += [self.nested.absmax, self.nested.code, self.nested.offset]
        return sum(t.numel() * t.element_size() for t in tensors)

    def bits_per_parameter(self) -> float:
        """Storage cost per original element, all scales and codebooks included."""
        return 8 * self.storage_bytes() / self.numel

    def to(self, device: torch.device | str) -> QuantState:
        nested = self.nested
        if nested is not None:
            nested = replace(
                nested,
                absmax=nested.absmax.to(device),
                code=nested.code.to(device),
                offset=nested.offset.to(device),
            )
        return replace(
            self,
            packed=self.packed.to(device),
            absmax=self.absmax.to(device),
            code=self.code.to(device),
            nested=nested,
        )

    # -- bitsandbytes Linear4bit state-dict layout -------------------------------------------

    def to_state_dict(self, prefix: str = "weight") -> dict[str, torch.Tensor]:
        """The tensors bitsandbytes' ``Linear4bit`` writes for its weight, under ``prefix``.

        nf4/fp4 produce exactly bitsandbytes' keys and bytes. int8 and nf2, which bitsandbytes
        does not have, use the same keys with a ``quant_state.qlora__<kind>`` blob.
        """
        info: dict[str, object] = {
            "quant_type": self.kind,
            "blocksize": self.blocksize,
            "dtype": _dtype_name(self.dtype),
            "shape": list(self.shape),
        }
        out = {
            prefix: self.packed.reshape(-1, 1),
            f"{prefix}.absmax": self.absmax,
            f"{prefix}.quant_map": self.code,
        }
        if self.nested is not None:
            out[f"{prefix}.nested_absmax"] = self.nested.absmax
            out[f"{prefix}.nested_quant_map"] = self.nested.code.clone()
            info["nested_blocksize"] = self.nested.blocksize
            info["nested_dtype"] = _dtype_name(self.nested.absmax.dtype)
            info["nested_offset"] = self.nested.offset.item()
        namespace = "bitsandbytes" if self.kind in BNB_KINDS else "qlora"
        blob = json.dumps(info).encode("utf-8")
        out[f"{prefix}.quant_state.{namespace}__{self.kind}"] = torch.tensor(
            list(blob), dtype=torch.uint8
        )
        return out

    @classmethod
    def from_state_dict(
        cls, tensors: dict[str, torch.Tensor], prefix: str = "weight", where: str = ""
    ) -> QuantState:
        """Rebuild a state from the keys written by `to_state_dict` or by bitsandbytes.

        Args:
            tensors: a state dict holding ``prefix`` and ``prefix.*`` keys (others are ignored).
            prefix: the weight's key.
            where: a name for error messages (e.g. the module path or file).
        """
        label = where or prefix
        blobs = [k for k in tensors if k.startswith(f"{prefix}.quant_state.")]
        if len(blobs) != 1:
            raise KeyError(
                f"{label}: expected exactly one '{prefix}.quant_state.<lib>__<kind>' entry, "
                f"found {len(blobs) or 'none'}; is this a 4-bit (bitsandbytes-layout) checkpoint?"
            )
        try:
            info = json.loads(bytes(tensors[blobs[0]].cpu().to(torch.uint8).tolist()))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{label}: unreadable quant_state blob {blobs[0]!r}: {err}") from err
        kind = info.get("quant_type")
        if kind not in KINDS and kind not in GGUF_BLOCK_KINDS:
            raise ValueError(
                f"{label}: unknown quant_type {kind!r}; expected one of {KINDS + GGUF_BLOCK_KINDS}"
            )
        for key in (prefix, f"{prefix}.absmax"):
            if key not in tensors:
                raise KeyError(f"{label}: missing tensor {key!r} in the quantized state dict")
        shape = torch.Size(info["shape"])
        packed = tensors[prefix].reshape(-1)
        if packed.dtype != torch.uint8:
            packed = packed.view(torch.uint8)  # bitsandbytes' quant_storage may be wider
        if kind in GGUF_BLOCK_KINDS:
            try:
                state = cls.from_gguf_blocks(packed, kind, shape, torch_dtype(info["dtype"]))
            except ValueError as err:
                raise ValueError(f"{label}: {err}") from None
            return state
        expected = -(-math.prod(shape) * BITS[kind] // 8)
        if packed.numel() != expected:
            raise ValueError(
                f"{label}: packed weight has {packed.numel()} bytes but shape {tuple(shape)} "
                f"in {kind} needs {expected}"
            )
        from qlora.quant.codebooks import codebook  # local: avoid a cycle at import time

        code = tensors.get(f"{prefix}.quant_map", codebook(kind)).float()
        nested = None
        if f"{prefix}.nested_absmax" in tensors:
            nested = NestedState(
                absmax=tensors[f"{prefix}.nested_absmax"].float(),
                code=tensors[f"{prefix}.nested_quant_map"].float(),
                offset=torch.tensor(float(info["nested_offset"]), dtype=torch.float32),
                blocksize=int(info["nested_blocksize"]),
            )
        return cls(
            kind=kind,
            packed=packed,
            absmax=tensors[f"{prefix}.absmax"],
            shape=shape,
            dtype=torch_dtype(info["dtype"]),
            blocksize=int(info["blocksize"]),
            code=code,
            nested=nested,
        )
