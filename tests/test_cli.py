import subprocess
import sys

import pytest

import qlora
from qlora.cli import main


def test_version_and_env(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "cpu dequant kernel" in out
    assert qlora.__version__ in out


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: qlora" in capsys.readouterr().out


def test_kernels_can_be_disabled_and_reference_path_is_used() -> None:
    code = (
        "import torch; from qlora.quant import quantize, dequantize, dequantize_reference;"
        "from qlora.quant.dequant import cpu_kernel; assert cpu_kernel() is None;"
        "s = quantize(torch.randn(100, 64), 'nf4');"
        "assert torch.equal(dequantize(s, torch.bfloat16), dequantize_reference(s, torch.bfloat16))"
    )
    env = {"QLORA_DISABLE_KERNELS": "1", "PATH": ""}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
