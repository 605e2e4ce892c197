"""`benchmarks/gpu_check.sh`: every CUDA test is in it, and without CUDA it says so and exits 0."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STEPS = ("gpu tests", "triton tests", "bench_triton", "bench_step", "bench_optim")


def _decorators(node: ast.FunctionDef) -> set[str]:
    return {ast.unparse(d) for d in node.decorator_list}


def test_every_cuda_only_test_is_marked_gpu() -> None:
    """gpu_check.sh runs ``pytest -m gpu``: a test skipped without CUDA must carry the mark."""
    unmarked = []
    for path in (ROOT / "tests").rglob("test_*.py"):
        tree = ast.parse(path.read_text())
        module_marks = {
            ast.unparse(node.value)
            for node in tree.body
            if isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                marks = _decorators(node) | module_marks
                if any("requires_cuda" in m for m in marks) and "pytest.mark.gpu" not in marks:
                    unmarked.append(f"{path.relative_to(ROOT)}::{node.name}")
    assert not unmarked, f"CUDA-only tests without @pytest.mark.gpu: {unmarked}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the script runs for minutes")
def test_without_cuda_every_step_is_skipped_and_the_exit_status_is_0(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable, "LOG_DIR": str(tmp_path)}
    done = subprocess.run(
        ["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    summary = done.stdout[done.stdout.index("gpu_check summary") :]
    for step in STEPS:
        assert f"{step:<13} SKIP" in summary
    assert "CUDA is not available: torch" in summary and "PYTHON=" in summary
    assert "result:  ok" in summary


def test_a_python_without_torch_is_an_error(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": str(tmp_path / "no-such-python"), "LOG_DIR": str(tmp_path)}
    done = subprocess.run(
        ["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=60, check=False
    )
    assert done.returncode == 2
    assert "did not run" in done.stdout and "result:  FAILED" in done.stdout


def _summary_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "gpu_check_summary", ROOT / "benchmarks" / "gpu_check_summary.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_summary_reads_each_benchmarks_json_line() -> None:
    summary = _summary_module()
    triton = {
        "bench": "triton",
        "device": "NVIDIA H200",
        "peak_gbs": 4800.0,
        "dequant": [
            {"n": 4096, "k": 4096, "mb": 45.1, "ms": 0.012, "gbs": 3758.2, "pct_peak": 78.3}
        ],
        "matmul": [
            {"n": 4096, "k": 4096, "m": m, "fused_ms": 0.01, "dequant_matmul_ms": 0.05,
             "dequant_out_matmul_ms": 0.04, "ratio": 5.0 / m, "fused_gbs": 900.0}
            for m in (1, 4)
        ],
    }  # fmt: skip
    lines, failed = summary.summarize("triton", "table\n" + json.dumps(triton) + "\n")
    assert "4096x4096 3758 GB/s (78% of 4800)" in lines[0]
    assert "4096x4096: M=1 5.0x, M=4 1.2x" in lines[1] and not failed
    step = {
        "rows": [{"arm": "ours-qlora", "ckpt": False, "step_s": 0.05, "tokens_per_s": 20480.0,
                  "peak_mib": 900.4}],
        "ratios": ["ours-qlora vs peft-qlora: 2.0x faster"],
    }  # fmt: skip
    lines, _ = summary.summarize("step", json.dumps(step))
    assert lines == [
        "ours-qlora: 50.0 ms/step, 20480 tok/s, peak 900 MiB",
        "ours-qlora vs peft-qlora: 2.0x faster",
    ]
    optim = {"qlora AdamW8bit": {"params": 100, "step_s": 0.002, "peak_growth": 2**21,
                                 "state_bytes": 203}}  # fmt: skip
    log = "bnb AdamW8bit: failed\nTraceback ...\n" + json.dumps(optim)
    lines, failed = summary.summarize("optim", log)
    assert lines == ["qlora AdamW8bit: 2.0 ms/step, peak growth 2 MiB, state 2.03 B/param"]
    assert failed == ["bnb AdamW8bit: failed"]
    with pytest.raises(ValueError, match="no JSON line"):
        summary.summarize("step", "Traceback (most recent call last):\n")
