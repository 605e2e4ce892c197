"""benchmarks/quality.py: the report is computed from the results (fast, synthetic results),
the quick pipeline runs end to end on the real default model (CI: three arms; slow: all),
and bad arguments fail with one line naming the culprit."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "quality.py"
ALPACA = ROOT.parent / "shared" / "data" / "alpaca_4500.json"
sys.path.insert(0, str(ROOT / "benchmarks"))  # benchmarks/ is not a package

pytest.importorskip("matplotlib")


def _result(task: str, arm: str, seed: int, before: float, after: float, **extra: Any) -> dict:
    result = {
        "task": task,
        "arm": arm,
        "seed": seed,
        "eval_loss_before": before,
        "eval_loss_after": after,
        "curve": [[0, before], [2, (before + after) / 2], [4, after]],
        "train_losses": [before, after],
        "trainable_params": 134_515_008 if arm == "full-fp32" else 4_884_480,
        "total_params": 139_399_488,
        "base_bits_per_param": 32.0 if arm in ("full-fp32", "lora-fp32") else 4.14,
        "peak_rss_mib": 1000.0 + seed,
        "train_seconds": 10.0,
        "seconds": 30.0,
        "budget": {
            "steps": 4,
            "batch_size": 2,
            "lr_lora": 5e-4,
            "lr_full": 5e-5,
            "warmup_steps": 0,
            "eval_every": 2,
            "n_eval": 4,
            "max_seq_len": 96,
            "n_train": 16,
            "max_new_tokens": 6,
        },
        "threads": 2,
        "loftq_iters": 5 if arm.startswith("loftq") else None,
    }
    result.update(extra)
    return result


def _synthetic(nf4_after: float) -> list[dict]:
    runs = [
        _result("alpaca", "full-fp32", 0, 2.0, 1.78),
        _result("alpaca", "lora-fp32", 0, 2.0, 1.80),
        _result("alpaca", "lora-fp32", 1, 2.0, 1.82),
        _result("alpaca", "qlora-nf4-dq", 0, 2.1, nf4_after),
        _result("alpaca", "qlora-nf4-dq", 1, 2.1, nf4_after + 0.02),
        _result("alpaca", "qlora-fp4", 0, 2.2, 1.95),
        _result("alpaca", "qlora-nf2", 0, 20.0, 15.0),
        _result("alpaca", "loftq-nf2", 0, 12.0, 8.0),
    ]
    runs += [
        _result("reverse", "lora-fp32", 0, 3.9, 0.5, accuracy_before=0.0, accuracy_after=0.8),
        _result("reverse", "qlora-nf4-dq", 0, 4.7, 0.6, accuracy_before=0.0, accuracy_after=0.7),
    ]
    return runs


@pytest.mark.parametrize(("nf4_after", "verdict"), [(1.82, "within"), (1.95, "outside")])
def test_report_is_computed_from_the_results(tmp_path: Path, nf4_after: float, verdict: str):
    report = importlib.import_module("quality_report")
    path = tmp_path / "docs" / "results.md"
    summary = report.write_report(_synthetic(nf4_after), path, data=ALPACA)
    text = path.read_text()
    plot = path.with_name("results_eval_loss.png")
    assert plot.is_file() and plot.stat().st_size > 10_000
    assert f"]({plot.name})" in text
    assert not list(path.parent.glob("*.tmp*"))  # written atomically
    lora, nf4 = (1.80 + 1.82) / 2, (2 * nf4_after + 0.02) / 2
    assert summary["alpaca_nf4_vs_lora"] == pytest.approx(nf4 / lora - 1, abs=1e-5)
    assert f"{verdict} the 2% tolerance" in text
    assert f"{lora:.4f} ± " in text and "(n=2)" in text  # mean ± sd over the two seeds
    assert summary["alpaca_order"][0] == "full-fp32" and summary["alpaca_order"][-1] == "qlora-nf2"
    assert "LoftQ on NF2" in text and summary["alpaca_loftq_nf2_closed"] == pytest.approx(
        (15.0 - 8.0) / (15.0 - lora), abs=1e-4
    )
    assert "| 80% |" in text and "lora-fp32 80%, qlora-nf4-dq 70%" in text
    rows = [line for line in text.splitlines() if line.startswith("| qlora-nf2 |")]
    assert len(rows) == 1 and "| 20.0000 |" in rows[0]


@pytest.mark.parametrize(
    ("bf16_after", "verdict"),
    [
        ((0.501, 0.499, 0.5005, 0.4995), "within 1% (the whole interval)"),
        ((0.56, 0.44, 0.51, 0.49), "within 1% in the mean, but the interval is wider"),
        ((0.60, 0.45, 0.55, 0.47), "not distinguishable from no change"),
        ((0.55, 0.551, 0.549, 0.55), "outside 1% (the whole interval)"),
    ],
)
def test_bf16_compute_is_compared_seed_by_seed(
    tmp_path: Path, bf16_after: tuple[float, ...], verdict: str
) -> None:
    """The bf16-compute arm against the float32 one, paired by seed, with a 95% interval."""
    report = importlib.import_module("quality_report")
    fp32_after = (0.5, 0.5, 0.5, 0.5)
    runs = [
        _result("reverse", arm, seed, 4.7, after, accuracy_before=0.0, accuracy_after=0.5)
        for arm, afters in (("qlora-nf4-dq", fp32_after), ("qlora-nf4-dq-bf16", bf16_after))
        for seed, after in enumerate(afters)
    ]
    path = tmp_path / "results.md"
    summary = report.write_report(runs, path, data=ALPACA)
    change, error, half = summary["reverse_bf16_vs_fp32_compute_paired"]
    diffs = [(b - a) / 0.5 for a, b in zip(fp32_after, bf16_after, strict=True)]
    mean = sum(diffs) / 4
    sd = (sum((d - mean) ** 2 for d in diffs) / 3) ** 0.5
    assert change == pytest.approx(mean, abs=1e-5)
    assert error == pytest.approx(sd / 2, abs=1e-5)
    assert half == pytest.approx(3.182 * sd / 2, abs=1e-5)  # t at 3 degrees of freedom
    assert "paired over 4 seeds" in path.read_text() and verdict in path.read_text()


def test_bf16_pair_at_a_lower_learning_rate_has_its_own_line(tmp_path: Path) -> None:
    report = importlib.import_module("quality_report")
    runs = [
        _result("reverse", f"{arm}{suffix}", seed, 4.7, after + 0.001 * seed)
        for suffix, after in (("", 0.5), ("-lr0.3", 0.9))
        for arm in ("qlora-nf4-dq", "qlora-nf4-dq-bf16")
        for seed in (0, 1, 2)
    ]
    summary = report.write_report(runs, tmp_path / "results.md", data=ALPACA)
    text = (tmp_path / "results.md").read_text()
    assert "compute (NF4 + DQ): held-out loss 0.5010 vs 0.5010" in text
    assert "compute (NF4 + DQ at 0.3x the learning rate): held-out loss 0.9010 vs 0.9010" in text
    assert summary["reverse_bf16_vs_fp32_compute_lr03"] == 0.0
    assert summary["reverse_bf16_vs_fp32_compute_lr03_paired"] == [0.0, 0.0, 0.0]


def _run(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout
    )


def test_bad_arguments_fail_with_one_line(tmp_path: Path) -> None:
    proc = _run("--arms", "lora-fp32,qlora-nf3", "--out", str(tmp_path))
    assert proc.returncode == 2 and "unknown arm 'qlora-nf3'" in proc.stderr
    proc = _run("--data", str(tmp_path / "missing.json"), "--out", str(tmp_path))
    assert proc.returncode == 2 and "missing.json: no such file" in proc.stderr
    proc = _run("--tasks", "gsm8k", "--out", str(tmp_path))
    assert proc.returncode == 2 and "unknown task 'gsm8k'" in proc.stderr


def _default_model_or_skip() -> None:
    from tests.default_model import default_model_or_skip

    default_model_or_skip()


def _check_quick(tmp_path: Path, arms: list[str], tasks: list[str], timeout: int = 900) -> dict:
    out, report = tmp_path / "out", tmp_path / "results.md"
    common = ["--quick", "--tasks", ",".join(tasks), "--out", str(out), "--report", str(report)]
    proc = _run(*common, "--arms", ",".join(arms), timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    assert line["quick"] is True and line["runs"] == len(arms) * len(tasks)
    text = report.read_text()
    for task in tasks:
        assert f"### {task}" in text
        for arm in arms:
            result = json.loads((out / task / arm / "seed0" / "result.json").read_text())
            steps = result["budget"]["steps"]
            assert [point[0] for point in result["curve"]] == list(range(steps + 1))
            assert result["curve"][-1][1] == result["eval_loss_after"]
            assert len(result["train_losses"]) == steps
            assert result["peak_rss_mib"] > 100 and result["trainable_params"] > 0
            assert (out / task / arm / "seed0" / "train" / "metrics.jsonl").is_file()
            assert sum(line.startswith(f"| {arm} |") for line in text.splitlines()) >= 1
    # The report is rebuilt from the saved results without running anything again.
    again = _run(*common, "--arms", ",".join(arms), "--report-only", timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads(again.stdout.strip().splitlines()[-1])["runs"] == line["runs"]
    return {
        task: {
            arm: json.loads((out / task / arm / "seed0" / "result.json").read_text())
            for arm in arms
        }
        for task in tasks
    }


def test_quick_pipeline_on_the_default_model(tmp_path: Path) -> None:
    """Three arms (CI-sized): LoftQ starts an NF2 base measurably closer to the float32 model."""
    _default_model_or_skip()
    tasks = ["alpaca", "reverse"] if ALPACA.is_file() else ["reverse"]
    results = _check_quick(tmp_path, ["lora-fp32", "qlora-nf2", "loftq-nf2"], tasks)
    for task in tasks:
        arms = results[task]
        assert arms["lora-fp32"]["base_bits_per_param"] == 32.0
        assert 2.0 < arms["qlora-nf2"]["base_bits_per_param"] < 2.5
        # Real behaviour: the 2-bit base alone is far worse than float32, and LoftQ's
        # adapter absorbs part of the quantization error before any training.
        assert arms["qlora-nf2"]["eval_loss_before"] > arms["lora-fp32"]["eval_loss_before"] + 1
        assert arms["loftq-nf2"]["eval_loss_before"] < arms["qlora-nf2"]["eval_loss_before"]
        assert arms["loftq-nf2"]["trainable_params"] == arms["lora-fp32"]["trainable_params"]
        assert arms["loftq-nf2"]["loftq_iters"] == 5


@pytest.mark.slow
def test_quick_mode_runs_every_arm(tmp_path: Path) -> None:
    _default_model_or_skip()
    from quality import DEFAULT_ARMS

    tasks = ["alpaca", "reverse"] if ALPACA.is_file() else ["reverse"]
    # ~8 min on the 2-core build box; a loaded machine has taken over 15, hence the slack.
    _check_quick(tmp_path, list(DEFAULT_ARMS), tasks, timeout=2700)
