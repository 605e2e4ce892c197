"""SlotKVCache: one key/value cache for a batch of requests that come and go.

Each running request owns a *row* (a slot) of per-layer tensors [slots, kv_heads, capacity,
head_dim]. Its tokens are stored left-aligned, position p at column p, and ``lengths[row]``
says how many are filled, so rows of different lengths share one tensor without padding
being shifted around: a request joining the batch fills its own row from column 0, a
decode step writes each row's new key at its own column, and attention masks each row's
columns beyond its length.

Rows are kept dense: ``0 .. rows-1`` are the running requests in the order the decoder
sees them, and `release` moves the last row into the freed one (one row copy per finished
request), so a step works on the leading ``rows`` slots as plain views, never a gather.

The capacity (columns) starts small and doubles when a row needs more, up to the model's
context: a batch of short chats does not reserve memory for 8192-token conversations.
"""

from __future__ import annotations

import torch

__all__ = ["SlotKVCache"]

_FIRST_CAPACITY = 256


class SlotKVCache:
    """Keys and values of ``layers`` attention layers for up to ``slots`` rows.

    Args:
        layers: number of attention layers.
        slots: most rows at once (the decoder's max batch).
        kv_heads, head_dim: the attention's key/value shape.
        max_length: the model's context; no row grows beyond it.
        dtype, device: of the stored keys and values (the model's activations').
    """

    def __init__(
        self,
        layers: int,
        slots: int,
        kv_heads: int,
        head_dim: int,
        max_length: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.slots = slots
        self.max_length = max_length
        self._shape = (slots, kv_heads, 0, head_dim)
        self._dtype = dtype
        self._device = device
        self.keys: list[torch.Tensor] = []  # per layer [slots, kv_heads, capacity, head_dim]
        self.values: list[torch.Tensor] = []
        self._layers = layers
        with torch.inference_mode():  # only ever read and written under inference mode
            self.lengths = torch.zeros(slots, dtype=torch.long, device=device)  # [slots]
        self.rows = 0
        self._allocate(min(_FIRST_CAPACITY, max_length))

    @property
    def capacity(self) -> int:
        return int(self.keys[0].shape[2])

    def nbytes(self) -> int:
        """Bytes held by the keys and values of every layer."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    @torch.inference_mode()
    def _allocate(self, capacity: int) -> None:
        slots, heads, _, dim = self._shape
        old = list(zip(self.keys, self.values, strict=True))
        self.keys, self.values = [], []
        for layer in range(self._layers):
            keys = torch.zeros(slots, heads, capacity, dim, dtype=self._dtype, device=self._device)
            values = torch.zeros_like(keys)
            if old:
                filled = old[layer][0].shape[2]
                keys[:, :, :filled] = old[layer][0]
                values[:, :, :filled] = old[layer][1]
            self.keys.append(keys)
            self.values.append(values)

    def reserve(self, length: int) -> None:
        """Makes room for rows of ``length`` tokens (doubling, up to the context).

        Raises:
            ValueError: ``length`` is beyond the model's context.
        """
        if length > self.max_length:
            raise ValueError(
                f"a sequence of {length} tokens is beyond the model's context of {self.max_length}"
            )
        capacity = self.capacity
        if length <= capacity:
            return
        while capacity < length:
            capacity *= 2
        self._allocate(min(capacity, self.max_length))

    @torch.inference_mode()
    def add_row(self) -> int:
        """A new empty row at the end; returns its index.

        Raises:
            RuntimeError: every slot is taken.
        """
        if self.rows == self.slots:
            raise RuntimeError(f"all {self.slots} rows of the KV cache are in use")
        self.rows += 1
        self.lengths[self.rows - 1] = 0
        return self.rows - 1

    @torch.inference_mode()
    def release(self, row: int) -> None:
        """Frees ``row``; the last row moves into it (its keys, values and length)."""
        if not 0 <= row < self.rows:
            raise IndexError(f"row {row} is not in use (rows: {self.rows})")
        last = self.rows - 1
        if row != last:
            filled = int(self.lengths[last])
            for tensors in (self.keys, self.values):
                for layer in tensors:
                    layer[row, :, :filled] = layer[last, :, :filled]
            self.lengths[row] = self.lengths[last]
        self.lengths[last] = 0
        self.rows = last
