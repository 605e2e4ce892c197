"""`qlora.procinfo`: the one reader of this process's resident memory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from qlora import procinfo
from qlora.procinfo import peak_rss_bytes, reset_peak_rss, rss_bytes, status_bytes

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc"
)
MiB = 1 << 20


def test_fields_are_bytes() -> None:
    rss, peak = rss_bytes(), peak_rss_bytes()
    assert 10 * MiB < rss <= peak  # a Python process with torch loaded
    assert rss % 1024 == 0 and status_bytes("VmHWM") >= rss
    assert status_bytes("VmPeak") >= status_bytes("VmSize") > 0


def test_reset_restarts_the_peak_from_now() -> None:
    before = rss_bytes()
    block = bytearray(96 * MiB)  # zero pages are not resident until written
    block[::4096] = b"x" * (len(block) // 4096)
    high = peak_rss_bytes()
    assert high >= before + 80 * MiB
    del block  # a large allocation goes back to the OS at once (its own mapping)
    # the peak stays (the kernel's counters are per-CPU caches: equal to within a few pages)
    assert peak_rss_bytes() > high - 8 * MiB
    reset_peak_rss()
    assert peak_rss_bytes() < high - 64 * MiB


def test_unknown_field_or_non_size_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"no field 'VmNothing'"):
        status_bytes("VmNothing")
    with pytest.raises(ValueError, match=r"field 'Name' is not a size"):
        status_bytes("Name")


def test_imports_only_the_standard_library() -> None:
    # loaded from its file, past qlora/__init__ (which imports torch)
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('procinfo', {procinfo.__file__!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "assert module.peak_rss_bytes() > 0\n"
        "heavy = {'torch', 'numpy', 'qlora'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
