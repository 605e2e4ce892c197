"""An adapter laid out for decoding: low-rank updates added to the rows of a batch that use it.

A decoder layer multiplies the same input by several projections: q, k and v read the
normed hidden state, gate and up read the other one. Their adapters' first factors can
therefore be applied in one matmul: with A_cat = [s_q·A_q; s_k·A_k; s_v·A_v] ([Σr, in]),

    h = x · A_catᵀ                      [m, Σr]   (one matmul instead of three)
    q += h[:, q's r columns] · B_qᵀ      [m, out_q], and so on for k and v,

which is scaling · B(A(x)) per projection, the `LoRALinear` update, with the scaling folded
into A (exact when the scaling is a power of two, as alpha / r usually is; otherwise one
float32 rounding apart). A "site" is such a group of projections sharing an input; a
`PreparedAdapter` holds one `SiteUpdate` (or None) per site of the decoder, built once when
the adapter is loaded, so a decode step does two small matmuls and an add per projection an
adapter touches, on just the rows that use it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["PreparedAdapter", "SiteUpdate", "add_site_update", "prepare_adapter"]

# A [r, in], B [out, r], scaling (as `qlora.models.batch_decode.LowRank`).
_LowRank = tuple[torch.Tensor, torch.Tensor, float]


@dataclass(frozen=True)
class SiteUpdate:
    """The update of one site (projections sharing an input) for one adapter.

    Attributes:
        a: [Σr, in] the scaled A of every projection of the site the adapter has, stacked.
        parts: per projection of the site: (first, last) columns of x·aᵀ that are its rank,
            and its B [out, r]; None where the adapter leaves the projection alone.
    """

    a: torch.Tensor
    parts: tuple[tuple[int, int, torch.Tensor] | None, ...]


@dataclass(frozen=True)
class PreparedAdapter:
    """One adapter for a decoder: an update (or None) per site, in the decoder's site order."""

    sites: tuple[SiteUpdate | None, ...]


def _site_update(members: Sequence[_LowRank | None]) -> SiteUpdate | None:
    present = [m for m in members if m is not None]
    if not present:
        return None
    a = torch.cat([weight_a * scaling for weight_a, _, scaling in present])  # [Σr, in]
    parts: list[tuple[int, int, torch.Tensor] | None] = []
    start = 0
    for member in members:
        if member is None:
            parts.append(None)
            continue
        rank = member[0].shape[0]
        parts.append((start, start + rank, member[1]))
        start += rank
    return SiteUpdate(a, tuple(parts))


def prepare_adapter(
    weights: Mapping[str, _LowRank], sites: Sequence[Sequence[str]]
) -> PreparedAdapter:
    """``weights`` (module path -> A, B, scaling) laid out over ``sites`` (module paths that
    share an input, in the decoder's order).

    Raises:
        ValueError: the adapter has a layer that is in no site (the decoder would skip it).
    """
    known = {path for site in sites for path in site}
    unknown = sorted(set(weights) - known)
    if unknown:
        raise ValueError(
            f"the adapter has layers the batch decoder does not run ({', '.join(unknown[:3])}); "
            "only the attention and MLP projections and lm_head can carry an adapter here"
        )
    return PreparedAdapter(tuple(_site_update([weights.get(p) for p in site]) for site in sites))


def add_site_update(
    outputs: Sequence[torch.Tensor],
    x: torch.Tensor,
    update: SiteUpdate,
    rows: torch.Tensor | None,
) -> None:
    """Adds the site's update in place: outputs[j][rows] += (x[rows]·aᵀ)[:, part j]·B_jᵀ.

    Args:
        outputs: the site's projections' base outputs, each [n, out_j] (written in place).
        x: the site's input [n, in].
        update: the adapter's update of this site.
        rows: indices [m] of the rows that use the adapter, or None for all rows.
    """
    picked = x if rows is None else x.index_select(0, rows)  # [m, in]
    hidden = F.linear(picked.to(update.a.dtype), update.a)  # [m, Σr]
    for out, part in zip(outputs, update.parts, strict=True):
        if part is None:
            continue
        start, end, weight_b = part
        delta = F.linear(hidden[:, start:end], weight_b).to(out.dtype)  # [m, out]
        if rows is None:
            out.add_(delta)
        else:
            out.index_add_(0, rows, delta)
