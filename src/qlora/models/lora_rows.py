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

When one batch holds G different adapters, doing that per adapter costs G times the small
ops, and at decode sizes the ops' overhead is the cost. `stack_adapters` stacks the G
adapters of a site instead (each projection's rank padded with zeros to the largest), and
the rows are placed on a [G, m] grid, adapter by adapter (`row_layout`; m is the largest
group, the rest zero padding), so that

    h = bmm(grid [G, m, in], Aᵀ [G, in, S])          [G, m, S]
    out_j[row] += bmm(h[..., part j], B_jᵀ [G, r, out])[the row's slot]

is a fixed number of ops per site whatever G is (Punica's and S-LoRA's batched gather-matmul,
with the gather done once per batch change instead of per step); each adapter's weights are
read once per step. Each row gets scaling · B(A(x)) of its own adapter (to float32 summation
order); padding slots are zeros and add 0.0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "MAX_DESCRIBED_RANK",
    "PreparedAdapter",
    "RowLayout",
    "SiteUpdate",
    "StackedAdapters",
    "StackedSite",
    "add_site_update",
    "add_stacked_update",
    "prepare_adapter",
    "row_layout",
    "site_table",
    "stack_adapters",
]

# A [r, in], B [out, r], scaling (as `qlora.models.batch_decode.LowRank`).
_LowRank = tuple[torch.Tensor, torch.Tensor, float]


@dataclass(frozen=True)
class SiteUpdate:
    """The update of one site (projections sharing an input) for one adapter.

    Attributes:
        a: [Σr, in] the scaled A of every projection of the site the adapter has, stacked.
        parts: per projection of the site: (first, last) columns of x·aᵀ that are its rank,
            and its B [out, r]; None where the adapter leaves the projection alone.
        descriptor: the same for the C glue's ``lora_rows`` (`qlora.models.decode_glue`):
            int64 [15], a's address, Σr, in, then per projection (up to 3) the address of
            Bᵀ [r, out] (0: none), first, last, out; None unless float32 on the CPU.
        stored: the tensors the descriptor points to, kept alive with it: a and the Bᵀ.
    """

    a: torch.Tensor
    parts: tuple[tuple[int, int, torch.Tensor] | None, ...]
    descriptor: torch.Tensor | None = None
    stored: tuple[torch.Tensor, ...] = ()


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
    return _with_descriptor(SiteUpdate(a, tuple(parts)))


_DESCRIBED_PARTS = 3  # projections per site a descriptor has room for (q, k, v)
MAX_DESCRIBED_RANK = 1024  # the most ranks of a site the C glue takes (decode.c: MAX_SITE_RANK)


def _with_descriptor(update: SiteUpdate) -> SiteUpdate:
    """``update`` with its C descriptor (see `SiteUpdate`), when the C glue can read it."""
    a = update.a
    on_cpu = a.device.type == "cpu" and a.dtype == torch.float32
    if not on_cpu or len(update.parts) > _DESCRIBED_PARTS or a.shape[0] > MAX_DESCRIBED_RANK:
        return update
    if any(p is not None and p[2].dtype != torch.float32 for p in update.parts):
        return update
    a = a.contiguous()
    fields = [a.data_ptr(), a.shape[0], a.shape[1]]
    stored = [a]
    for part in update.parts:
        if part is None:
            fields += [0, 0, 0, 0]
            continue
        bt = part[2].t().contiguous()  # [r, out]: the C loop runs along the outputs
        stored.append(bt)
        fields += [bt.data_ptr(), part[0], part[1], bt.shape[1]]
    fields += [0, 0, 0, 0] * (_DESCRIBED_PARTS - len(update.parts))
    descriptor = torch.tensor(fields, dtype=torch.int64)
    return SiteUpdate(update.a, update.parts, descriptor, tuple(stored))


def site_table(adapters: Sequence[PreparedAdapter | None], sites: int) -> torch.Tensor | None:
    """[sites, n] int64: for each site and row, the address of the row's adapter's
    descriptor of that site (0: no update), for the C glue's ``lora_rows``. None when no row
    has an adapter or one of their updates has no descriptor (the torch path then runs)."""
    if all(adapter is None for adapter in adapters):
        return None
    table = torch.zeros(sites, len(adapters), dtype=torch.int64)
    for row, adapter in enumerate(adapters):
        if adapter is None:
            continue
        for site, update in enumerate(adapter.sites):
            if update is None:
                continue
            if update.descriptor is None:
                return None
            table[site, row] = update.descriptor.data_ptr()
    return table


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


@dataclass(frozen=True)
class StackedSite:
    """A site's updates of G adapters stacked for batched matmuls (`stack_adapters`).

    Attributes:
        a: [G, S, in]: per adapter, each projection's scaled A padded with zero rows to the
            widest rank any of the G has for it (S = the sum of those ranks).
        parts: per projection: (first, last) of its rank within S, and the B's transposed and
            padded with zero rows, [G, r, out]; None where no adapter of the G has it.
    """

    a: torch.Tensor
    parts: tuple[tuple[int, int, torch.Tensor] | None, ...]


@dataclass(frozen=True)
class StackedAdapters:
    """G adapters stacked for every site (None where none of them has an update)."""

    count: int
    sites: tuple[StackedSite | None, ...]


@dataclass(frozen=True)
class RowLayout:
    """Where each row of a batch sits in the [G, m] grid the stacked matmuls run on: group g
    (its adapter) holds its rows in slots 0..m-1 (m: the largest group), padding is zeros.

    Attributes:
        slots: [n'] flat slot g·m + k of each row that has an adapter (n' of the n rows).
        rows: [n'] those rows' indices in the batch.
        targets: [G·m] the row each slot adds into (padding: row 0, which gets + 0.0).
        groups, width: G and m.
    """

    slots: torch.Tensor
    rows: torch.Tensor
    targets: torch.Tensor
    groups: int
    width: int


def row_layout(
    adapter_of_row: Sequence[int | None], groups: int, device: torch.device | None = None
) -> RowLayout:
    """The grid for rows whose adapters are ``adapter_of_row`` (group index or None)."""
    members: list[list[int]] = [[] for _ in range(groups)]
    for row, group in enumerate(adapter_of_row):
        if group is not None:
            members[group].append(row)
    width = max(len(m) for m in members)
    slots, rows = [], []
    targets = [0] * (groups * width)
    for group, group_rows in enumerate(members):
        for k, row in enumerate(group_rows):
            slots.append(group * width + k)
            rows.append(row)
            targets[group * width + k] = row
    return RowLayout(
        torch.tensor(slots, device=device),
        torch.tensor(rows, device=device),
        torch.tensor(targets, device=device),
        groups,
        width,
    )


def _stack_site(updates: Sequence[SiteUpdate | None]) -> StackedSite | None:
    present = [u for u in updates if u is not None]
    if not present:
        return None
    members = len(present[0].parts)
    widths = [
        max((p[1] - p[0] for u in present if (p := u.parts[j]) is not None), default=0)
        for j in range(members)
    ]
    like = present[0].a
    a = like.new_zeros(len(updates), sum(widths), like.shape[1])  # [G, S, in]
    parts: list[tuple[int, int, torch.Tensor] | None] = []
    start = 0
    for j, rank in enumerate(widths):
        if rank == 0:
            parts.append(None)
            continue
        out_features = next(p[2].shape[0] for u in present if (p := u.parts[j]) is not None)
        b = like.new_zeros(len(updates), rank, out_features)  # [G, r, out]
        for g, update in enumerate(updates):
            part = update.parts[j] if update is not None else None
            if part is not None:
                first, last, weight_b = part
                a[g, start : start + last - first] = update.a[first:last]
                b[g, : last - first] = weight_b.t()
        parts.append((start, start + rank, b))
        start += rank
    return StackedSite(a, tuple(parts))


def stack_adapters(adapters: Sequence[PreparedAdapter]) -> StackedAdapters:
    """``adapters`` (G of them, prepared for the same sites) stacked, site by site."""
    sites = zip(*(adapter.sites for adapter in adapters), strict=True)
    return StackedAdapters(len(adapters), tuple(_stack_site(updates) for updates in sites))


def add_stacked_update(
    outputs: Sequence[torch.Tensor], x: torch.Tensor, site: StackedSite, layout: RowLayout
) -> None:
    """Adds, in place, each row's own adapter's update of the site (rows without an adapter
    get nothing): two batched matmuls over the [G, m] grid, whatever G is."""
    grid = x.new_zeros(layout.groups * layout.width, x.shape[1], dtype=site.a.dtype)
    grid.index_copy_(0, layout.slots, x.index_select(0, layout.rows).to(site.a.dtype))
    grid = grid.view(layout.groups, layout.width, -1)  # [G, m, in]
    hidden = torch.bmm(grid, site.a.transpose(1, 2))  # [G, m, S]
    for out, part in zip(outputs, site.parts, strict=True):
        if part is None:
            continue
        start, end, weight_bt = part
        delta = torch.bmm(hidden[:, :, start:end], weight_bt)  # [G, m, out]
        out.index_add_(0, layout.targets, delta.view(-1, delta.shape[-1]).to(out.dtype))
