"""Writing files so that a failure never loses what was there: the one place that does it.

Every file the project writes goes through here:

* `atomic_write` / `atomic_open`: the bytes go into a temporary file in the destination's
  directory (same file system, so the final ``os.replace`` is atomic), are flushed and
  fsynced, and only then replace the destination. A reader sees the old file or the new
  one, never half of either; a crash leaves at most a stray ``.*.tmp`` file.
* `staged_directory`: a set of files written into a temporary directory, published all at
  once (a new destination) or file by file (an existing one: its other files stay).
* `check_destination` / `refuse_source`: whether a directory may be written at all. The
  rule for every directory of model or adapter files: a destination that holds anything we
  did not write is refused unless the caller says ``overwrite``, and even then only the
  files we write are replaced (nothing is ever deleted); the directory a model was loaded
  from is never written, since replacing its files would lose the model being used.

Permissions follow the user's umask like any other tool's (``mkstemp`` / ``mkdtemp`` create
0600 / 0700 entries, which would make a shared adapter unreadable to the group): files
become ``0o666 & ~umask``, directories ``0o777 & ~umask``.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import shutil
import tempfile
from collections.abc import Collection, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

__all__ = [
    "DestinationError",
    "atomic_open",
    "atomic_write",
    "check_destination",
    "check_file_destination",
    "check_stale",
    "current_umask",
    "name_listing",
    "refuse_source",
    "staged_directory",
]


class DestinationError(FileExistsError):
    """A destination may not be written as asked; the message names it and the way out."""


def current_umask() -> int:
    """The process's umask, read without changing it where Linux allows."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, but brief)
    os.umask(mask)
    return mask


def _file_mode() -> int:
    return 0o666 & ~current_umask()


def _dir_mode() -> int:
    return 0o777 & ~current_umask()


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", **kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temporary file that replaces ``path`` atomically when the block exits cleanly.

    Args:
        path: the destination; its directory must exist.
        mode: "wb" or "w" (text; ``kwargs`` such as ``encoding`` go to ``open``).

    On an exception the temporary file is removed and ``path`` is untouched.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """Replace ``path`` with ``data`` (text as UTF-8) atomically; returns the path."""
    if isinstance(data, str):
        with atomic_open(path, "w", encoding="utf-8") as f:
            f.write(data)
    else:
        with atomic_open(path, "wb") as f:
            f.write(data)
    return Path(path)


def name_listing(names: Iterable[str], limit: int = 4) -> str:
    """A few names for a one-line message (a name with a newline in it is quoted)."""
    names = sorted(n if n.isprintable() else repr(n) for n in names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_file_destination(path: str | os.PathLike, *, overwrite: bool) -> None:
    """Refuse to write the single file ``path`` where a directory stands, or over an existing
    file without ``overwrite`` (the file is then replaced atomically by the caller).

    Raises:
        DestinationError: the one-line reason and the way out.
    """
    path = Path(path)
    if path.is_dir():
        raise DestinationError(f"{path} is a directory; give the path of the file to write")
    if path.exists() and not overwrite:
        raise DestinationError(
            f"{path} exists; choose another path, or pass --overwrite (overwrite=True) to "
            "replace it"
        )


def check_destination(
    directory: str | os.PathLike, *, overwrite: bool, ours: Collection[str] = ()
) -> None:
    """Refuse to write into ``directory`` when it holds files we may not replace.

    Fine: a missing or empty directory, or one that holds only names in ``ours`` (files a
    previous write of the same kind left, e.g. an adapter's two files). Anything else is
    refused unless ``overwrite``; with it the caller writes through `staged_directory`,
    which replaces only the files it writes and keeps every other.

    Raises:
        DestinationError: ``directory`` is not a directory, or holds other files and not
            ``overwrite``. The one-line message names the directory and a few of its files.
    """
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise DestinationError(f"{path} exists and is not a directory; choose a directory")
    if overwrite or not path.is_dir():
        return
    foreign = [p.name for p in path.iterdir() if p.name not in ours and not _is_staging(p)]
    if foreign:
        raise DestinationError(
            f"{path} is not empty (it holds {name_listing(foreign)}); choose a new directory, or "
            "pass --overwrite (overwrite=True) to replace only the files this writes and "
            "keep all others"
        )


def _staging_prefix(directory: Path) -> str:
    return f".{Path(os.path.abspath(directory)).name}."  # "." has no name of its own


def _is_staging(entry: Path) -> bool:
    """A `staged_directory` left inside its destination by a killed process: hidden, read by
    no loader, so it neither blocks the next write nor is deleted by it."""
    return (
        entry.name.startswith(_staging_prefix(entry.parent))
        and entry.name.endswith(".tmp")
        and entry.is_dir()
    )


def _same_directory(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)  # symlinks, bind mounts, "..": one inode, one directory
    except OSError:
        return a.resolve() == b.resolve()


def refuse_source(
    directory: str | os.PathLike, sources: Iterable[str | os.PathLike], what: str = "the model"
) -> None:
    """Refuse to write into a directory that ``what`` was read from, overwrite or not.

    Replacing the files of the model being exported would lose it (and a memory-mapped
    read of it in progress would change underneath).

    Raises:
        DestinationError: ``directory`` is (a link to) one of ``sources``.
    """
    path = Path(directory)
    for source in sources:
        if path.exists() and _same_directory(path, Path(source)):
            raise DestinationError(
                f"{path} is the directory {what} was loaded from ({source}); writing there "
                "would replace its files, --overwrite or not: choose a new directory"
            )


def check_stale(
    directory: str | os.PathLike, written: Collection[str], patterns: Sequence[str]
) -> None:
    """Refuse when ``directory`` holds files matching ``patterns`` that ``written`` lacks.

    Such files (old weight shards beside a new single-file checkpoint, an adapter beside a
    merged model) would be read together with, or instead of, the new files. They may be
    the user's, so they are named, never deleted. Also refused: a name we write that is a
    directory there (a file cannot replace it).

    Raises:
        DestinationError: naming the files.
    """
    path = Path(directory)
    if not path.is_dir():
        return
    present = {p.name: p for p in path.iterdir()}
    stale = [
        name
        for name in present
        if name not in written and any(fnmatch.fnmatchcase(name, pat) for pat in patterns)
    ]
    if stale:
        raise DestinationError(
            f"{path} holds {name_listing(stale)}, which would be loaded with (or instead of) the "
            "files written now; they may be yours, so nothing is deleted: remove them or "
            "choose a new directory"
        )
    blocking = [n for n in written if n in present and present[n].is_dir()]
    if blocking:
        raise DestinationError(
            f"{path} has a directory named {name_listing(blocking)} where a file is to be "
            "written; move it or choose a new directory"
        )


@contextlib.contextmanager
def staged_directory(
    directory: str | os.PathLike, last: Sequence[str] = (), *, stale: Sequence[str] = ()
) -> Iterator[Path]:
    """Yield an empty temporary directory; on a clean exit publish its files to ``directory``.

    * a destination that does not exist yet is created by renaming the whole temporary
      directory (made beside it) into place - all or nothing;
    * an existing destination keeps its other files; each new file replaces its namesake
      with one atomic ``os.replace``. The temporary directory is made inside it (the same
      file system even when it is a mount point; its parent need not be writable). The
      files named in ``last`` (e.g. the ``*config.json`` that makes a directory loadable)
      move last, so a crash in between leaves the old config pointing at new weights at
      worst, never a config without weights.

    If anything raises before the move, the temporary directory is deleted and the
    destination is untouched (a killed process leaves it behind, hidden:
    ``.<name>.<random>.tmp``). Whether ``directory`` may be written at all (does the user
    own files there?) is the caller's decision, made before (`check_destination`).

    Args:
        directory: the destination; created (with parents) when missing.
        last: file names to move after all the others.
        stale: glob patterns of files that must not be left beside the new ones: checked
            with `check_stale` just before anything moves.

    Raises:
        NotADirectoryError: ``directory`` exists and is not a directory (before any writing).
        DestinationError: from the ``stale`` check (nothing moved).
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory} exists and is not a directory")
    if directory.is_dir():
        where = directory
    else:
        directory.parent.mkdir(parents=True, exist_ok=True)
        where = directory.parent
    prefix = _staging_prefix(directory)
    staging = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=where))
    try:
        yield staging
        if stale:
            check_stale(directory, {p.name for p in staging.iterdir()}, stale)
        _publish(staging, directory, last)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _publish(staging: Path, directory: Path, last: Sequence[str]) -> None:
    file_mode, dir_mode = _file_mode(), _dir_mode()
    for entry in staging.rglob("*"):
        entry.chmod(dir_mode if entry.is_dir() else file_mode)
    if not directory.exists():
        staging.chmod(dir_mode)
        try:
            os.replace(staging, directory)
            return
        except OSError:  # created meanwhile by someone else: fall back to file by file
            directory.mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in staging.iterdir())
    ordered = [n for n in names if n not in last] + [n for n in last if n in names]
    for name in ordered:
        os.replace(staging / name, directory / name)
