"""Write a set of files into a directory so that a failure never loses what was there.

Everything is first written into a fresh temporary directory next to the destination (same
file system, so renames are atomic). Only when every file is complete does anything move:

* a destination that does not exist yet is created by renaming the whole temporary
  directory into place - all or nothing;
* an existing destination (e.g. a training ``out/`` folder that also holds logs) keeps its
  other files; each new file replaces its namesake with one atomic ``os.replace``. The
  files named in ``last`` (the ``*config.json`` that makes a directory loadable) move last,
  so a crash in between leaves the old config pointing at new weights of the same shape at
  worst, never a config without weights.

If anything raises before the move, the temporary directory is deleted and the destination
is untouched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

__all__ = ["staged_directory"]


@contextlib.contextmanager
def staged_directory(directory: str | os.PathLike, last: Sequence[str] = ()) -> Iterator[Path]:
    """Yield an empty temporary directory; on a clean exit publish its files to ``directory``.

    Args:
        directory: the destination; created (with parents) when missing.
        last: file names to move after all the others.

    Raises:
        NotADirectoryError: ``directory`` exists and is not a directory (before any writing).
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory} exists and is not a directory")
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(
        tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent)
    )
    try:
        yield staging
        _publish(staging, directory, last)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _publish(staging: Path, directory: Path, last: Sequence[str]) -> None:
    if not directory.exists():
        try:
            os.replace(staging, directory)
            return
        except OSError:  # created meanwhile by someone else: fall back to file by file
            directory.mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in staging.iterdir())
    ordered = [n for n in names if n not in last] + [n for n in last if n in names]
    for name in ordered:
        os.replace(staging / name, directory / name)
