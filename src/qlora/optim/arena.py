"""Where paged optimizer state lives: one flat byte buffer off the compute device.

Two backings:

* **file** - a memory-mapped file in a directory the user names (a sparse file, space reserved
  with ``posix_fallocate`` so a full disk is a clear error now rather than a SIGBUS later; it
  is unlinked at once, so a crash leaves nothing behind). Pages are read in by the kernel when
  touched; after each page is updated, ``madvise(MADV_DONTNEED)`` drops it from the process:
  the mapping is shared, so the data stays in the file (and the page cache, which the kernel
  reclaims under pressure) and only the page budget is ever resident. ``MADV_WILLNEED`` on
  the next page starts its read-ahead while the current one updates.
* **host** - ordinary host memory, pinned when the compute device is a GPU so copies to and
  from it run asynchronously.
"""

from __future__ import annotations

import mmap
import os
import tempfile
import warnings
from pathlib import Path

import torch

__all__ = ["PAGE", "StateArena"]

PAGE = mmap.PAGESIZE
# Releases are widened to this alignment. A page fault on a file mapping also maps the
# neighbouring pages already in the page cache ("fault-around", 64 KiB by default): at a
# segment's edge that re-maps pages of the previous, already released, segment. Dropping
# mappings of pages that are not mapped, or belong to the next page, costs nothing: the data
# stays in the page cache.
_RELEASE_ALIGN = 2 << 20


def _filesystem_type(directory: Path) -> str:
    """The type of the filesystem holding ``directory`` ("" when unknown)."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return ""
    path, best, kind = str(directory.resolve()), -1, ""
    for line in mounts:
        fields = line.split()
        if len(fields) < 3 or len(fields[1]) <= best:
            continue
        if path == fields[1] or path.startswith(fields[1].rstrip("/") + "/"):
            best, kind = len(fields[1]), fields[2]
    return kind


class StateArena:
    """A flat, zero-initialized buffer of ``nbytes`` bytes, file-backed or in host memory.

    Args:
        nbytes: size in bytes.
        directory: back the buffer with a memory-mapped file in this directory; None keeps it
            in host memory.
        pin: pin host memory (for asynchronous copies to a GPU).
    """

    def __init__(self, nbytes: int, directory: str | Path | None = None, pin: bool = False):
        self.nbytes = max(int(nbytes), PAGE)
        self.file_backed = directory is not None
        self._map: mmap.mmap | None = None
        self._pin = pin
        if directory is None:
            return
        folder = Path(directory)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix="qlora-optimizer-", suffix=".state", dir=folder)
        except OSError as err:
            raise OSError(
                f"{folder}: cannot create the paged optimizer state file ({err.strerror}); "
                "name a writable directory (train.optim_dir)"
            ) from None
        try:
            try:
                os.posix_fallocate(fd, 0, self.nbytes)
            except OSError as err:
                raise OSError(
                    f"{folder}: cannot reserve {self.nbytes / 2**20:.0f} MiB for the paged "
                    f"optimizer state ({err.strerror}); free disk space or name another "
                    "directory (train.optim_dir)"
                ) from None
            self._map = mmap.mmap(fd, self.nbytes, mmap.MAP_SHARED)
            self._address = torch.frombuffer(self._map, dtype=torch.uint8, count=1).data_ptr()
        finally:
            os.close(fd)
            os.unlink(name)
        if _filesystem_type(folder) in ("tmpfs", "ramfs"):
            warnings.warn(
                f"{folder} is a RAM-backed filesystem: paging optimizer state there saves no "
                "memory; name a directory on disk",
                stacklevel=3,
            )

    def view(self, offset: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A zero-initialized [numel] tensor of ``dtype`` at byte ``offset`` (aligned to the
        dtype's size). Each has its own storage, so ``torch.save`` writes just its bytes; in
        host memory it is simply a fresh (pinned) tensor."""
        if self._map is None:
            return torch.zeros(numel, dtype=dtype, pin_memory=self._pin)
        return torch.frombuffer(self._map, dtype=dtype, count=numel, offset=offset)

    def _advise(self, ranges: list[tuple[int, int]], advice: int, align: int = PAGE) -> None:
        if self._map is None:
            return
        for start, end in ranges:
            lo = start - start % align
            hi = min(self.nbytes, -(-end // align) * align)
            if hi > lo:
                self._map.madvise(advice, lo, hi - lo)

    def release(self, ranges: list[tuple[int, int]]) -> None:
        """Drop the byte ``ranges`` from resident memory (file-backed only; data is kept)."""
        self._advise(ranges, mmap.MADV_DONTNEED, _RELEASE_ALIGN)

    def prefetch(self, ranges: list[tuple[int, int]]) -> None:
        """Start reading the byte ``ranges`` in (file-backed only)."""
        self._advise(ranges, mmap.MADV_WILLNEED)

    def resident_bytes(self) -> int:
        """Bytes of this buffer resident in the process now (file-backed: from
        /proc/self/smaps; host memory: its size)."""
        if self._map is None:
            return self.nbytes
        header = f"{self._address:08x}-"
        inside = False
        for line in Path("/proc/self/smaps").read_text().splitlines():
            if line[:1].isalnum() and "-" in line.split()[0] and ":" not in line.split()[0]:
                inside = line.startswith(header)
            elif inside and line.startswith("Rss:"):
                return int(line.split()[1]) * 1024
        return 0
