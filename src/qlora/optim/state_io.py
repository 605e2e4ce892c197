"""AdamW state in torch.optim's state-dict layout, and back into slots (any bit width).

``{"state": {index: {...}}, "param_groups": [...]}``; per parameter ``step`` and ``exp_avg``
/ ``exp_avg_sq`` shaped like the parameter (float32, or uint8 codes plus ``exp_avg_absmax`` /
``exp_avg_sq_absmax`` when 8-bit). A 32-bit state dict is interchangeable with
``torch.optim.AdamW``'s; 8-bit and 32-bit state dicts load into each other (requantized or
dequantized chunk by chunk).
"""

from __future__ import annotations

from typing import Any

import torch

from qlora.optim.slots import Slot
from qlora.optim.state8bit import BLOCK, dequantize_state, quantize_state
from qlora.optim.update import CHUNK

__all__ = ["STATE_KEYS", "export_state", "load_slot", "saved_param_ids"]

STATE_KEYS = ("exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax")


def export_state(slots: list[Slot], param_groups: list[dict[str, Any]]) -> dict[str, Any]:
    """The state dict of ``slots`` (views of the live state, not copies)."""
    state: dict[int, dict[str, Any]] = {}
    for slot in slots:
        if slot.step == 0:
            continue
        entry: dict[str, Any] = {"step": torch.tensor(float(slot.step))}
        for key, t in zip(STATE_KEYS, slot.tensors, strict=False):
            entry[key] = t.view(slot.param.shape) if key in STATE_KEYS[:2] else t
        state[slot.index] = entry
    groups, start = [], 0
    for group in param_groups:
        saved = {k: v for k, v in group.items() if k != "params"}
        saved["params"] = list(range(start, start + len(group["params"])))
        start += len(group["params"])
        groups.append(saved)
    return {"state": state, "param_groups": groups}


def saved_param_ids(
    state_dict: dict[str, Any], param_groups: list[dict[str, Any]], owner: str
) -> list[int]:
    """The saved ids of this optimizer's parameters, in order, after checking that the saved
    groups match this optimizer's group for group.

    Raises:
        ValueError: a different number of groups, or of parameters in a group.
    """
    groups = state_dict.get("param_groups")
    if not isinstance(groups, list) or len(groups) != len(param_groups):
        raise ValueError(
            f"{owner}.load_state_dict: the saved state has "
            f"{len(groups) if isinstance(groups, list) else 'no'} parameter groups, this "
            f"optimizer {len(param_groups)}"
        )
    for saved, group in zip(groups, param_groups, strict=True):
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(
                f"{owner}.load_state_dict: a saved group has "
                f"{len(saved['params'])} parameters, this optimizer's "
                f"{len(group['params'])}: the model or its adapters changed"
            )
    return [i for saved in groups for i in saved["params"]]


def load_slot(slot: Slot, entry: dict[str, Any], owner: str) -> None:
    """Copy a saved parameter's state into ``slot``, converting 8-bit ↔ 32-bit if needed.

    Raises:
        ValueError: the entry lacks moments of the parameter's size, or 8-bit scales.
    """
    m, v = entry.get("exp_avg"), entry.get("exp_avg_sq")
    if m is None or v is None or m.numel() != slot.numel or v.numel() != slot.numel:
        raise ValueError(
            f"{owner}.load_state_dict: parameter {slot.index} (shape "
            f"{tuple(slot.param.shape)}) has no matching exp_avg/exp_avg_sq in the saved "
            "state"
        )
    slot.step = int(float(entry["step"]))
    saved_8bit = m.dtype == torch.uint8
    absmax = (entry.get("exp_avg_absmax"), entry.get("exp_avg_sq_absmax"))
    if saved_8bit and (absmax[0] is None or absmax[1] is None):
        raise ValueError(
            f"{owner}.load_state_dict: parameter {slot.index}: 8-bit state "
            "without its absmax scales"
        )
    m, v = m.reshape(-1), v.reshape(-1)
    if saved_8bit == slot.quantized:  # same format: copy as is
        sources = [m, v, *absmax] if saved_8bit else [m, v]
        for dst, src in zip(slot.tensors, sources, strict=True):
            dst.copy_(src)
        return
    for start in range(0, slot.numel, CHUNK):  # convert chunk by chunk
        end = min(slot.numel, start + CHUNK)
        for which, src in enumerate((m, v)):
            if saved_8bit:
                _widen_chunk(slot, which, src, absmax[which], start, end)
            else:
                _narrow_chunk(slot, which, src, start, end)


def _widen_chunk(
    slot: Slot, which: int, codes: torch.Tensor, absmax: torch.Tensor, start: int, end: int
) -> None:
    """Saved 8-bit moment ``which`` (0: m, 1: v), elements [start, end) -> float32 slot."""
    bs, be = start // BLOCK, -(-end // BLOCK)
    wide = torch.empty(end - start, dtype=torch.float32)
    dequantize_state(
        codes[start:end].contiguous(), absmax[bs:be].float().contiguous(), which == 0, wide
    )
    slot.tensors[which][start:end].copy_(wide)


def _narrow_chunk(slot: Slot, which: int, values: torch.Tensor, start: int, end: int) -> None:
    """Saved float moment ``which`` (0: m, 1: v), elements [start, end) -> 8-bit slot."""
    bs, be = start // BLOCK, -(-end // BLOCK)
    wide = values[start:end].float().cpu().contiguous()
    codes = torch.empty(end - start, dtype=torch.uint8)
    scales = torch.empty(be - bs, dtype=torch.float32)
    quantize_state(wide, which == 0, codes, scales)
    slot.tensors[which][start:end].copy_(codes)
    slot.tensors[2 + which][bs:be].copy_(scales)
