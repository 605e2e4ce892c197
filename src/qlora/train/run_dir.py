"""The output directory a training run owns: claimed, locked, and never someone else's.

A run writes checkpoints, ``metrics.jsonl``, ``loss.png``, ``config.yaml`` and its adapter
into ``train.output_dir``. Before anything is written the directory is *claimed*:

* it must be new, empty, or an earlier qlora run's (it holds ``qlora-run.json``, written when
  a run claims a directory). A folder with other files - the current directory, a project
  folder with its own ``config.yaml`` - is refused: nothing of the user's is overwritten.
* it is locked (``flock`` on ``.qlora.lock``, which holds the owner's pid) for the whole
  run, so two trainings into one directory cannot interleave their files; the kernel drops
  the lock when the process dies, even by SIGKILL, so there is no stale lock to clean up.
* an earlier run's outputs are continued only with ``resume`` and replaced only with
  ``overwrite``; without either the claim fails and says which to use.

Each run has an id, kept in ``qlora-run.json`` and in every checkpoint it writes: resuming
considers, and pruning deletes, only checkpoints of the run that owns the directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from qlora.files import atomic_write, name_listing
from qlora.train.checkpoint import checkpoint_dirs, checkpoint_run_id, only_checkpoint_files

__all__ = ["LOCK_FILE", "MARKER_FILE", "OutputDirError", "RunDirectory", "claim_output_dir"]

MARKER_FILE = "qlora-run.json"
LOCK_FILE = ".qlora.lock"


class OutputDirError(RuntimeError):
    """The output directory cannot be used by this run; the message says what to do."""


@dataclass
class RunDirectory:
    """A claimed output directory: its path, the owning run's id, and the held lock."""

    path: Path
    run_id: str
    lock: IO[Any] | None = field(default=None, repr=False)

    def release(self) -> None:
        if self.lock is not None:
            self.lock.close()  # closing the descriptor drops the flock
            self.lock = None

    def __enter__(self) -> RunDirectory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def own_checkpoints(self) -> list[tuple[int, Path]]:
        """(step, path) of this run's checkpoints, oldest first."""
        return [
            (s, p) for s, p in checkpoint_dirs(self.path) if checkpoint_run_id(p) == self.run_id
        ]

    def prune(self, keep: int) -> None:
        """Delete this run's checkpoints but the newest ``keep``; never another run's."""
        for _, path in self.own_checkpoints()[:-keep]:
            if only_checkpoint_files(path):
                shutil.rmtree(path, ignore_errors=True)


def _take_lock(path: Path) -> IO[Any]:
    lock = open(path / LOCK_FILE, "a+")  # noqa: SIM115 - held for the run, closed in release()
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        lock.close()
        raise OutputDirError(
            f"{path} is in use by another training run (pid {holder}); wait for it to finish "
            "or choose another train.output_dir"
        ) from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def _earlier_outputs(path: Path) -> list[str]:
    return [p.name for p in path.iterdir() if p.name not in (MARKER_FILE, LOCK_FILE)]


def _start_over(path: Path, run_id: str) -> None:
    """``overwrite``: delete the earlier run's checkpoints (ours by name and content)."""
    for _, ckpt in checkpoint_dirs(path):
        if only_checkpoint_files(ckpt) and checkpoint_run_id(ckpt) not in (None, run_id):
            shutil.rmtree(ckpt)
    with contextlib.suppress(FileNotFoundError):
        (path / "latest").unlink()


def claim_output_dir(
    output_dir: str | os.PathLike, *, resume: bool = False, overwrite: bool = False
) -> RunDirectory:
    """Claim ``output_dir`` for a run (see the module docstring); release it when done.

    Raises:
        OutputDirError: an empty path, a file, a folder holding files that are not a qlora
            run's, a directory another process is training into, or an earlier run's
            outputs without ``resume`` / ``overwrite``.
    """
    if not str(output_dir).strip():
        raise OutputDirError(
            "train.output_dir is empty: name the directory this run should own, e.g. out/my-run"
        )
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"train.output_dir {path} is a file, not a directory")
    marker = path / MARKER_FILE
    if path.is_dir() and not marker.is_file():
        foreign = [n for n in os.listdir(path) if n != LOCK_FILE]
        if foreign:
            raise OutputDirError(
                f"{path} already holds files that are not a qlora run's ({name_listing(foreign)}); "
                "choose a new or empty output directory (or an earlier run's)"
            )
    path.mkdir(parents=True, exist_ok=True)
    lock = _take_lock(path)
    try:
        run_id = _claim_marker(path, marker, resume=resume, overwrite=overwrite)
    except BaseException:
        lock.close()
        raise
    for leftover in path.glob(".checkpoint-*.tmp"):  # staging of a killed save
        shutil.rmtree(leftover, ignore_errors=True)
    return RunDirectory(path, run_id, lock)


def _claim_marker(path: Path, marker: Path, *, resume: bool, overwrite: bool) -> str:
    earlier = None
    if marker.is_file():
        try:
            earlier = json.loads(marker.read_text()).get("run_id")
        except (OSError, ValueError, AttributeError):
            earlier = None
    if earlier and resume:
        return str(earlier)
    outputs = _earlier_outputs(path)
    if outputs and not overwrite and not resume:
        checkpoints = [p.name for _, p in checkpoint_dirs(path)]
        what = (
            f"checkpoints ({name_listing(checkpoints)})" if checkpoints else name_listing(outputs)
        )
        raise OutputDirError(
            f"{path} holds an earlier run's {what}: pass --resume to continue it, "
            "--overwrite to start over (replaces that run's files), or choose another "
            "train.output_dir"
        )
    run_id = uuid.uuid4().hex
    if overwrite:
        _start_over(path, run_id)
    created = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    atomic_write(marker, json.dumps({"run_id": run_id, "created": created}) + "\n")
    return run_id
