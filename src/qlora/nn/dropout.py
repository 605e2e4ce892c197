"""Counter-based dropout: the keep-mask is a pure function of two seed words and the index.

``torch.nn.Dropout`` draws a Bernoulli mask from the generator and autograd keeps it (one
byte per element) plus the dropped-out copy of the input (four bytes per element) until
backward. For LoRA, whose dropout sits on the input of every adapted layer, that is the
largest share of the adapters' activation memory, and on this class of CPU drawing the mask
(``bernoulli_``, ~10 ns per element) costs more time than the adapters' matmuls.

Here element i of a flattened tensor is kept when

    lowbias32(lowbias32(i ⊕ seed_a) ⊕ seed_b) ≥ round(p · 2³²)

(``lowbias32``: Chris Wellons' 32-bit xor-shift-multiply mixer), and kept elements are
scaled by 1 / (1 − p). Two uint32 seed words are drawn from torch's default generator per
call, so runs stay reproducible under ``torch.manual_seed``, resumable from a saved RNG state,
and gradient checkpointing (which restores the RNG state before recomputing) regenerates the
same mask. Backward regenerates the mask from the seeds instead of storing it.

The mask differs from ``nn.Dropout``'s (a different generator), not in distribution: each
element is dropped independently with probability p (to 2⁻³²).

`keep_mask_reference` computes the hash with PyTorch int64 arithmetic: the oracle that the C
kernel (``qlora/kernels/ops.c``, loaded by `qlora.kernels.c_extension`) is tested against, and
the fallback where it is not built or kernels are disabled.
"""

from __future__ import annotations

import torch

from qlora.kernels import c_extension

__all__ = ["apply_dropout", "draw_seeds", "keep_mask_reference"]

_MASK32 = 0xFFFFFFFF


def draw_seeds() -> tuple[int, int]:
    """Two uint32 seed words from torch's default CPU generator."""
    words = torch.randint(0, 2**32, (2,), dtype=torch.int64)
    return int(words[0]), int(words[1])


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """(x · constant) mod 2³² for int64 x in [0, 2³²), without int64 overflow."""
    low = (x & 0xFFFF) * constant  # < 2^48
    high = ((x >> 16) * constant) & 0xFFFF  # only its low 16 bits survive the shift below
    return (low + (high << 16)) & _MASK32


def _lowbias32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _threshold(p: float) -> int:
    return min(round(p * 2**32), _MASK32)


def keep_mask_reference(
    numel: int, seeds: tuple[int, int], p: float, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """bool [numel]: True where element i survives dropout with probability ``p``."""
    index = torch.arange(numel, dtype=torch.int64, device=device)
    hashed = _lowbias32(_lowbias32(index ^ seeds[0]) ^ seeds[1])
    return hashed >= _threshold(p)


def apply_dropout(
    x: torch.Tensor,
    seeds: tuple[int, int],
    p: float,
    out: torch.Tensor | None = None,
    into: torch.Tensor | None = None,
) -> torch.Tensor:
    """keep(i) · x[i] / (1 − p) for every element; added into ``out`` when it is given.

    Args:
        x: contiguous tensor [*].
        seeds: the two seed words of this dropout call (`draw_seeds`).
        p: drop probability in [0, 1).
        out: optional tensor [*] (same shape, dtype, device) to accumulate into.
        into: optional contiguous float32 tensor [*] to write the result to (C kernel path;
            elsewhere a new tensor is returned).

    Returns:
        ``out`` after ``out += dropout(x)``; else ``into`` (when the kernel wrote it) or a
        new tensor.
    """
    if x.numel() >= 2**32:
        raise ValueError(f"dropout over {x.numel()} elements: at most 2^32 - 1 per call")
    scale = 1.0 / (1.0 - p)
    kernel = c_extension("ops")
    if (
        kernel is not None
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.is_contiguous()
        and (out is None or (out.is_contiguous() and out.dtype == torch.float32))
    ):
        result = (torch.empty_like(x) if into is None else into) if out is None else out
        kernel.dropout(
            x.data_ptr(),
            result.data_ptr(),
            x.numel(),
            seeds[0],
            seeds[1],
            _threshold(p),
            scale,
            int(out is not None),
            torch.get_num_threads(),
        )
        return result
    keep = keep_mask_reference(x.numel(), seeds, p, x.device).view(x.shape)
    dropped = torch.where(keep, x * scale, torch.zeros((), dtype=x.dtype, device=x.device))
    if out is None:
        return dropped
    return out.add_(dropped)
