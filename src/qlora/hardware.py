"""Which dtype the frozen base's matmuls run in when the user says ``compute_dtype: auto``.

bfloat16 is a win only where the hardware multiplies it natively. On a CPU with AVX512-BF16
(``vdpbf16ps``) or AMX-BF16 tiles, oneDNN multiplies bf16 2-8x faster than MKL's float32
sgemm (measured on the default model's shapes: Zen 4 about 2.2x, Sapphire Rapids with AMX
about 7x); on an AVX2-only CPU the same bf16 matmul is emulated and ~65x slower. So the
choice is made from the CPU's own flags (Linux: /proc/cpuinfo; aarch64 reports ``bf16``),
and where those cannot be read, by one short measured comparison of the two dtypes. CUDA
devices that support bf16 (compute capability 8.0+) take bf16, as the QLoRA recipe does.

The answer is a property of the machine, so it is computed once per process and cached.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["ComputeChoice", "choose_compute_dtype", "cpu_flags"]

# Flags that mean a native bf16 dot product: x86 (Linux names) and aarch64 (FEAT_BF16).
BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")
# A measured bf16 matmul must beat float32 by this much to be chosen without flags.
MEASURED_MARGIN = 1.2


@dataclass(frozen=True)
class ComputeChoice:
    """The chosen dtype and the reason, in words (``qlora env`` prints both)."""

    dtype: torch.dtype
    reason: str

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


@functools.cache
def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str] | None:
    """The first CPU's feature flags, or None where they cannot be read (not Linux)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):  # x86 | aarch64
            return frozenset(value.split())
    return None


def _median_seconds(a: torch.Tensor, b: torch.Tensor, repeats: int = 5) -> float:
    a @ b  # warm-up: oneDNN builds its kernel on first use
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


@functools.cache
def measured_bf16_speedup(size: int = 512) -> float:
    """float32 time / bfloat16 time of one [size, size] @ [size, size] matmul (~10 ms)."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator)
    b = torch.randn(size, size, generator=generator)
    fp32 = _median_seconds(a, b)
    bf16 = _median_seconds(a.bfloat16(), b.bfloat16())
    return fp32 / max(bf16, 1e-9)


def _cpu_choice(flags: frozenset[str] | None) -> ComputeChoice:
    if flags is not None:
        native = [f for f in BF16_FLAGS if f in flags]
        if native:
            return ComputeChoice(torch.bfloat16, f"the CPU has native bf16 ({', '.join(native)})")
        return ComputeChoice(
            torch.float32, "the CPU has no native bf16 (no avx512_bf16/amx_bf16 flag)"
        )
    speedup = measured_bf16_speedup()
    dtype = torch.bfloat16 if speedup >= MEASURED_MARGIN else torch.float32
    return ComputeChoice(
        dtype, f"CPU flags unreadable; a bf16 matmul measured {speedup:.2f}x float32's speed"
    )


def choose_compute_dtype(device: torch.device | str = "cpu") -> ComputeChoice:
    """What ``compute_dtype: auto`` means on ``device``: bfloat16 where it is native, else
    float32 (see the module docstring)."""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) >= (8, 0):  # Ampere and later: native bf16 tensor cores
            return ComputeChoice(torch.bfloat16, f"the GPU has native bf16 (sm_{major}{minor})")
        return ComputeChoice(
            torch.float32, f"the GPU has no native bf16 (sm_{major}{minor} < sm_80)"
        )
    if device.type != "cpu":
        return ComputeChoice(torch.float32, f"{device.type} devices keep float32")
    return _cpu_choice(cpu_flags())
