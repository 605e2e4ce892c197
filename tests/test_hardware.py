"""``compute_dtype: auto``: the hardware's answer, from the CPU flags or one measurement."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qlora import hardware
from qlora.config import ConfigError, QuantConfig
from qlora.hardware import _cpu_choice, choose_compute_dtype, cpu_flags


def _cpuinfo(tmp_path: Path, text: str, name: str = "cpuinfo") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_flags_are_read_from_x86_and_aarch64_cpuinfo(tmp_path: Path) -> None:
    x86 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16\n\nprocessor\t: 1\n"
    assert cpu_flags(_cpuinfo(tmp_path, x86)) >= {"avx512_bf16", "amx_bf16"}
    arm = "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n"
    assert "bf16" in cpu_flags(_cpuinfo(tmp_path, arm, "cpuinfo-arm"))
    assert cpu_flags(str(tmp_path / "missing")) is None


def test_flags_decide_and_say_why() -> None:
    native = _cpu_choice(frozenset({"avx2", "avx512_bf16"}))
    assert native.dtype == torch.bfloat16 and "avx512_bf16" in native.reason
    amx = _cpu_choice(frozenset({"amx_bf16"}))
    assert amx.dtype == torch.bfloat16
    avx2 = _cpu_choice(frozenset({"avx2", "fma", "f16c"}))
    assert avx2.dtype == torch.float32 and "no native bf16" in avx2.reason


def test_unreadable_flags_fall_back_to_a_measurement(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardware, "measured_bf16_speedup", lambda: 2.5)
    fast = _cpu_choice(None)
    assert fast.dtype == torch.bfloat16 and "2.50x" in fast.reason
    monkeypatch.setattr(hardware, "measured_bf16_speedup", lambda: 0.02)
    assert _cpu_choice(None).dtype == torch.float32


def test_the_measurement_runs_and_is_positive() -> None:
    assert hardware.measured_bf16_speedup(64) > 0


def test_this_machine_agrees_with_its_flags() -> None:
    flags = cpu_flags()
    choice = choose_compute_dtype("cpu")
    if flags is not None:
        native = bool(flags & set(hardware.BF16_FLAGS))
        assert choice.dtype == (torch.bfloat16 if native else torch.float32)
    assert choice.name in ("bfloat16", "float32")


def test_auto_is_the_config_default_and_names_are_checked() -> None:
    assert QuantConfig().compute_dtype == "auto"
    assert QuantConfig(compute_dtype="bfloat16").compute_dtype == "bfloat16"
    with pytest.raises(ConfigError, match="compute_dtype"):
        QuantConfig(compute_dtype="bf16")  # type: ignore[arg-type]


def test_env_prints_the_choice(capsys: pytest.CaptureFixture[str]) -> None:
    from qlora.cli import main

    assert main(["env"]) == 0
    out = capsys.readouterr().out
    choice = choose_compute_dtype("cpu")
    assert f"compute_dtype auto (cpu)  {choice.name}: {choice.reason}" in out
