"""lossless_int8: an 8-bit blockwise copy of a weight that dequantizes to it bit for bit, when
the weight was itself made from 8-bit blocks.

A weight that came out of a GGUF file's Q8_0 blocks (the default model's tied embedding and
output head, for one) is, in every block of 32, an integer q in [-127, 127] times one
float16 scale d, and each product q·d is exact in float32 (7 + 11 significant bits). Q8_0
picks d = max|x| / 127, so the block's largest |w| is exactly 127·d and

    d = max|w| / 127        (correctly rounded division of an exact product: exactly d)
    q = w / d               (exactly an integer)

recover the blocks. Stored as codes q + 128 into the codebook [-128, ..., 127] with the scale
d per block, `qlora.quant.dequantize` and the fused decode kernel form code · scale = w, the
same float32 value, from a quarter of the bytes: decoding reads the 113 MB float32 output
head of the default model as 32 MB instead. For any other weight (trained or converted in
float precision) the check fails and the caller keeps the weight as it is: nothing here
approximates.
"""

from __future__ import annotations

import torch

from qlora.quant.state import QuantState

__all__ = ["INTEGER_CODE", "lossless_int8"]

# The codebook of codes that are plain integers: code i means i - 128.
INTEGER_CODE = torch.arange(256, dtype=torch.float32) - 128


def lossless_int8(weight: torch.Tensor, blocksize: int = 32) -> QuantState | None:
    """An int8 blockwise state (scale per ``blocksize`` values, integer codes) equal to
    ``weight`` bit for bit after dequantization, or None when ``weight`` is not such blocks.

    Args:
        weight: a float32 2-D tensor [out, in] with ``in`` a multiple of ``blocksize``.
        blocksize: values per scale (32: GGUF's Q8_0).
    """
    if weight.dim() != 2 or weight.dtype != torch.float32 or weight.shape[1] % blocksize:
        return None
    blocks = weight.detach().reshape(-1, blocksize)  # [nblocks, bs]
    scale = blocks.abs().amax(dim=1) / 127  # [nblocks]
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero block: codes 0
    codes = blocks / scale[:, None]  # [nblocks, bs]: integers if the weight is such blocks
    if not torch.equal(codes, codes.round()) or not torch.equal(codes * scale[:, None], blocks):
        return None
    return QuantState(
        kind="int8",
        packed=(codes + 128).to(torch.uint8).reshape(-1),  # [out * in]
        absmax=scale,
        shape=weight.shape,
        dtype=torch.float32,
        blocksize=blocksize,
        code=INTEGER_CODE.clone(),
    )
