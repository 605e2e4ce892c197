"""Paged state on a CPU stays out of resident memory: measured through the process's peak
RSS (VmHWM) and the mapping's own Rss, against torch.optim.AdamW in the same conditions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGE = 4 << 20
# besides the page: the 8-bit scratch (2 MiB), a few 1 MiB chunk temporaries of the update,
# the state file's first-touch bookkeeping,
# allocator and fault-around slack
SLACK = 16 << 20


def _measure(name: str, state_dir: Path) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "tests.optim.rss_child", name, str(state_dir), str(PAGE)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        # glibc would otherwise serve the state from heap memory freed earlier (RSS that
        # never shows as growth): pinned, every large block is fresh, freed blocks go back
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_paged_state_resident_memory_stays_under_the_page_budget(tmp_path: Path) -> None:
    torch_adamw = _measure("adamw", tmp_path)
    paged = _measure("paged_adamw", tmp_path)
    eight = _measure("adamw8bit", tmp_path)
    paged8 = _measure("paged_adamw8bit", tmp_path)
    assert paged["state_bytes"] == 8 * 16 * 2**20  # 16.8M parameters x 2 fp32 moments
    assert paged8["state_bytes"] == eight["state_bytes"] == (2 + 8 / 256) * 16 * 2**20
    # unpaged: the whole state becomes resident; paged: one page of it, at most
    assert torch_adamw["peak_growth"] >= 0.9 * paged["state_bytes"]
    assert eight["peak_growth"] >= 0.9 * eight["state_bytes"]
    for result in (paged, paged8):
        assert result["peak_growth"] <= PAGE + SLACK, result
        assert result["resident"] <= PAGE, result  # after the step: released
    assert paged["peak_growth"] < 0.15 * paged["state_bytes"]
