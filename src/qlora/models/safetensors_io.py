"""Streaming safetensors I/O: read one tensor at a time from a memory map, write without
holding a whole shard in memory.

The format is small enough to own: 8 bytes little-endian header length N, N bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then the
raw little-endian tensor bytes, offsets relative to the end of the header.

Why not ``safetensors.safe_open``? Two reasons that matter for quantize-on-load:

* Resident memory. A memory-mapped page that has been read stays in the process's RSS until
  the mapping goes away, so streaming a 10 GB shard through ``safe_open`` leaves the whole
  shard resident by the end - the peak RSS would be the checkpoint's size, not the 4-bit
  model's. `SafetensorsReader.release` drops a consumed tensor's pages with
  ``madvise(MADV_DONTNEED)``: they stay in the page cache (the next run is fast) but stop
  counting against this process.
* Errors. A truncated download or a corrupt header should say which file, which tensor and
  how many bytes are missing, not fail deep inside a Rust binding.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import mmap
import os
import struct
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from qlora.files import atomic_open

__all__ = [
    "DTYPES",
    "SafetensorsError",
    "SafetensorsReader",
    "TensorInfo",
    "write_safetensors",
]

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's limit too
_PAGE = mmap.PAGESIZE


def _int_list(value: object) -> bool:
    """A JSON list of integers (bools and floats are not: ``[2.5]`` is no shape)."""
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    )


class SafetensorsError(ValueError):
    """A safetensors file is missing, truncated or malformed; the message names the file."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in its file."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def _header_length(path: Path, size: int, head: bytes) -> int:
    if size < 8:
        raise SafetensorsError(f"{path}: {size} bytes is too short to be a safetensors file")
    (length,) = struct.unpack("<Q", head[:8])
    if length > _MAX_HEADER or 8 + length > size:
        raise SafetensorsError(
            f"{path}: corrupt or truncated (header claims {length} bytes, file has {size}); "
            "re-download or re-save the checkpoint"
        )
    return length


class SafetensorsReader:
    """Read tensors from one ``.safetensors`` file, zero-copy from a read-only memory map.

    Tensors returned by `get` are views of the mapping: copy what you keep, then call
    `release` to drop the pages from this process's resident set. Use as a context manager.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise SafetensorsError(f"{self.path}: no such file")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            length = _header_length(self.path, size, head)
            raw = f.read(length)
        try:
            header = json.loads(raw.decode("utf-8"))
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
        except (UnicodeDecodeError, ValueError) as err:
            raise SafetensorsError(
                f"{self.path}: corrupt header ({err}); re-download or re-save the checkpoint"
            ) from None
        self.metadata = self._check_metadata(header.pop("__metadata__", None))
        base = 8 + length
        self.tensors: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            self.tensors[name] = self._check_entry(name, entry, base, size)
        self._check_overlaps()
        self._file = open(self.path, "rb")  # noqa: SIM115 - closed in close()
        self._map: mmap.mmap | None = None
        if size > base:
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)

    def _check_metadata(self, metadata: object) -> dict[str, str]:
        if metadata is None:
            return {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise SafetensorsError(
                f"{self.path}: __metadata__ must map strings to strings, got {metadata!r:.80}; "
                "the file is corrupt"
            )
        return metadata

    def _check_entry(self, name: str, entry: object, base: int, size: int) -> TensorInfo:
        """One header entry, every field checked: a corrupt or crafted header must fail
        here, naming the tensor, not later as a negative-size view or an out-of-range read."""
        where = f"{self.path}: tensor {name!r}"
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            raise SafetensorsError(f"{where}: malformed header entry {entry!r:.120}")
        raw_dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        dtype = DTYPES.get(raw_dtype) if isinstance(raw_dtype, str) else None
        if dtype is None:
            raise SafetensorsError(
                f"{where}: unsupported dtype {raw_dtype!r} (known: {', '.join(DTYPES)})"
            )
        if not _int_list(shape) or any(d < 0 for d in shape):
            raise SafetensorsError(
                f"{where}: shape {shape!r:.80} is not a list of non-negative integers; "
                "the file is corrupt"
            )
        if not _int_list(offsets) or len(offsets) != 2 or not 0 <= offsets[0] <= offsets[1]:
            raise SafetensorsError(
                f"{where}: data_offsets {offsets!r:.80} is not [begin, end] with "
                "0 <= begin <= end; the file is corrupt"
            )
        begin, end = offsets
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes:
            raise SafetensorsError(
                f"{where}: data_offsets {[begin, end]} do not match shape {list(shape)} "
                f"of {raw_dtype} ({nbytes} bytes); the file is corrupt"
            )
        if base + end > size:
            raise SafetensorsError(
                f"{where} needs bytes up to {base + end} but the file has only {size}: "
                "the file is truncated (an interrupted download or copy?); fetch it again"
            )
        return TensorInfo(name, dtype, tuple(shape), base + begin, nbytes)

    def _check_overlaps(self) -> None:
        """Two tensors sharing bytes: a crafted or corrupt header (the format forbids it)."""
        spans = sorted((i.start, i.start + i.nbytes, i.name) for i in self.tensors.values())
        spans = [span for span in spans if span[1] > span[0]]  # empty tensors own no bytes
        for (_, prev_end, prev), (start, _, name) in itertools.pairwise(spans):
            if start < prev_end:
                raise SafetensorsError(
                    f"{self.path}: tensor {name!r} overlaps tensor {prev!r} (their "
                    "data_offsets share bytes); the file is corrupt"
                )

    def names(self) -> list[str]:
        """Tensor names in file order."""
        return sorted(self.tensors, key=lambda k: self.tensors[k].start)

    def get(self, name: str) -> torch.Tensor:
        """A read-only view of tensor ``name`` (no copy; do not write to it)."""
        info = self.tensors.get(name)
        if info is None:
            raise SafetensorsError(f"{self.path}: no tensor {name!r}")
        if info.nbytes == 0 or self._map is None:
            return torch.empty(info.shape, dtype=info.dtype)
        with warnings.catch_warnings():  # the map is read-only, so is the view: by design
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            flat = torch.frombuffer(
                self._map, dtype=torch.uint8, count=info.nbytes, offset=info.start
            )
        return flat.view(info.dtype).view(info.shape)

    def release(self, name: str) -> None:
        """Drop tensor ``name``'s pages from this process's resident memory (not from disk)."""
        info = self.tensors[name]
        if self._map is None or info.nbytes == 0 or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = info.start - info.start % _PAGE
        self._map.madvise(mmap.MADV_DONTNEED, start, info.start + info.nbytes - start)

    def close(self) -> None:
        if self._map is not None:
            # BufferError: a caller still holds a view; the map closes when that is freed.
            with contextlib.suppress(BufferError):
                self._map.close()
            self._map = None
        self._file.close()

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_safetensors(
    path: str | os.PathLike,
    tensors: Iterable[tuple[str, torch.Tensor]] | dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
    *,
    specs: list[tuple[str, torch.dtype, tuple[int, ...]]] | None = None,
) -> None:
    """Write a safetensors file atomically (`qlora.files.atomic_open`: temp file, then rename).

    Args:
        path: destination.
        tensors: (name, tensor) pairs or a dict. With ``specs`` (name, dtype, shape for every
            tensor, in order) this may be a generator: the header is written first and each
            tensor is produced, written and dropped in turn, so a shard of any size is written
            in the memory of its largest tensor.
        metadata: the ``__metadata__`` string map (e.g. ``{"format": "pt"}``).
    """
    path = Path(path)
    items: Iterator[tuple[str, torch.Tensor]]
    if specs is None:
        pairs = list(tensors.items() if isinstance(tensors, dict) else tensors)
        specs = [(n, t.dtype, tuple(t.shape)) for n, t in pairs]
        items = iter(pairs)
    else:
        items = iter(tensors.items() if isinstance(tensors, dict) else tensors)
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, dtype, shape in specs:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {
            "dtype": _NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # align the data to 8 bytes, as the reference writer does
    with atomic_open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for (name, dtype, shape), (got_name, tensor) in zip(specs, items, strict=True):
            if got_name != name or tensor.dtype != dtype or tuple(tensor.shape) != shape:
                raise ValueError(
                    f"write_safetensors: expected {name} {dtype} {list(shape)}, got "
                    f"{got_name} {tensor.dtype} {list(tensor.shape)}"
                )
            data = tensor.detach().contiguous().cpu().reshape(-1)
            if data.numel():
                f.write(memoryview(data.view(torch.uint8).numpy()))
