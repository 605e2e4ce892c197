"""Markdown tables of estimates: by model size and method (`sizes_table`), and beside the
rule-of-thumb table published with LLaMA-Factory (`PUBLISHED_TABLE`, `compare_table`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from qlora.memory.estimate import GiB, estimate
from qlora.memory.shapes import METHODS, model_shape

TABLE_SIZES: tuple[str, ...] = ("7b", "13b", "30b", "70b", "110b", "8x7b", "8x22b")

# The rule-of-thumb table of fine-tuning memory (GB) circulated with LLaMA-Factory's README.
PUBLISHED_TABLE: dict[str, dict[str, float]] = {
    "full-amp": dict(zip(TABLE_SIZES, (120, 240, 600, 1200, 2000, 900, 2400), strict=True)),
    "full-16": dict(zip(TABLE_SIZES, (60, 120, 300, 600, 900, 400, 1200), strict=True)),
    "lora-16": dict(zip(TABLE_SIZES, (16, 32, 64, 160, 240, 120, 320), strict=True)),
    "qlora-8": dict(zip(TABLE_SIZES, (10, 20, 40, 80, 140, 60, 160), strict=True)),
    "qlora-4": dict(zip(TABLE_SIZES, (6, 12, 24, 48, 72, 30, 96), strict=True)),
    "qlora-2": dict(zip(TABLE_SIZES, (4, 8, 16, 24, 48, 18, 48), strict=True)),
}
# The documented settings for comparing with PUBLISHED_TABLE (see docs/memory.md).
COMPARE_SETTINGS: dict[str, Any] = {
    "batch": 1,
    "seq_len": 512,
    "rank": 16,
    "optimizer": "adamw",
    "device": "cuda",
    "compute_dtype": "bfloat16",
    "chunked_loss": False,
}


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[c]) for row in [header, *rows]) for c in range(len(header))]
    fmt = (
        "| "
        + " | ".join(f"{{:<{w}}}" if c == 0 else f"{{:>{w}}}" for c, w in enumerate(widths))
        + " |"
    )
    lines = [fmt.format(*header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += [fmt.format(*row) for row in rows]
    return "\n".join(lines)


def sizes_table(
    sizes: Sequence[str] = TABLE_SIZES,
    methods: Sequence[str] = METHODS,
    **settings: Any,
) -> str:
    """Total GiB for each model size (rows) and method (columns), as a Markdown table.

    ``settings`` are passed to `estimate` (batch, seq_len, rank, optimizer, grad_ckpt, ...).
    """
    header = ["model", *methods]
    rows = []
    for size in sizes:
        shape = model_shape(size)
        cells = [f"{size} ({shape.params() / 1e9:.3g}B)"]
        for method in methods:
            cells.append(f"{estimate(size, method, **settings).total / GiB:.1f}")  # type: ignore[arg-type]
        rows.append(cells)
    return _table(header, rows)


def compare_table(sizes: Sequence[str] = TABLE_SIZES, **overrides: Any) -> str:
    """Our estimate beside `PUBLISHED_TABLE`: "ours / published (ratio)" in GiB vs GB.

    Settings are `COMPARE_SETTINGS` (batch 1, seq 512, r=16, AdamW, bf16 on CUDA, full
    logits) with gradient checkpointing for LoRA/QLoRA only, updated by ``overrides``.
    """
    header = ["method", "bits", *sizes]
    bits = {"full-amp": "32", "full-16": "16", "lora-16": "16"}
    rows = []
    for method, published in PUBLISHED_TABLE.items():
        settings = {**COMPARE_SETTINGS, "grad_ckpt": not method.startswith("full"), **overrides}
        cells = [method, bits.get(method, method.rsplit("-", 1)[-1])]
        for size in sizes:
            ours = estimate(size, method, **settings).total / GiB  # type: ignore[arg-type]
            theirs = published.get(size)
            cells.append(
                f"{ours:.1f} / {theirs:g} ({ours / theirs:.2f}x)" if theirs else f"{ours:.1f}"
            )
        rows.append(cells)
    return _table(header, rows)
