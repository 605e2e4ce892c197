"""This process's memory as Linux accounts it: the one reader of ``/proc/self/status``.

Peak resident set (``VmHWM``) is what decides whether a run fits a machine, so trainers,
benchmarks and memory tests read it here. ``reset_peak_rss`` restarts the peak from the
current RSS, to measure one phase of a process. Linux only: elsewhere the readers raise
``OSError`` (callers that only report memory catch it).

Standard library only (no torch): reading a number must not itself cost memory or time.
"""

from __future__ import annotations

__all__ = ["peak_rss_bytes", "reset_peak_rss", "rss_bytes", "status_bytes"]

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


def status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (e.g. "VmHWM", "VmRSS", "RssAnon"), in bytes.

    Raises:
        OSError: /proc/self/status cannot be read (not Linux).
        ValueError: the file has no such field, or it is not a size.
    """
    with open(_STATUS, encoding="ascii") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name == field:
                return _parse_size(field, value)
    raise ValueError(f"{_STATUS} has no field {field!r} (sizes are e.g. VmHWM, VmRSS)")


def _parse_size(field: str, value: str) -> int:
    parts = value.split()  # the kernel writes every size as "<n> kB"
    if len(parts) == 2 and parts[0].isdigit() and parts[1] == "kB":
        return int(parts[0]) * 1024
    raise ValueError(f"{_STATUS} field {field!r} is not a size: {value.strip()!r}")


def rss_bytes() -> int:
    """Resident set size now (``VmRSS``)."""
    return status_bytes("VmRSS")


def peak_rss_bytes() -> int:
    """Peak resident set size (``VmHWM``) since the process started or `reset_peak_rss`."""
    return status_bytes("VmHWM")


def reset_peak_rss() -> None:
    """Restart ``VmHWM`` from the current RSS (writes "5" to /proc/self/clear_refs, Linux 4.0+).

    Raises:
        OSError: the file cannot be written (not Linux, or an older kernel).
    """
    with open(_CLEAR_REFS, "w", encoding="ascii") as f:
        f.write("5")
