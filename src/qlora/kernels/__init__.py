"""The fast kernels and the one place that decides whether they run.

The lowest layer of the package: it imports nothing from the rest of qlora, and quant, nn and
optim ask it for their kernels instead of importing the extensions themselves.

* ``_cpu`` (``cpu.c``): blockwise k-bit dequantize / quantize and the fused 8-bit AdamW step.
* ``_ops`` (``ops.c``): counter-based dropout for the fused LoRA path.
* ``_gguf`` (``gguf.c``): GGUF block dequantize (llama.cpp's Q4_0 ... Q6_K layouts).
* ``_matvec`` (``matvec.c``): fused dequantize + few-row matmul for decoding (AVX-512 / AVX2 /
  scalar, chosen at run time).
* ``_decode`` (``decode.c``): what runs between a decode step's projections (RMSNorm with the
  residual add, rotary + KV-cache write + attention, SwiGLU).
* ``triton_dequant.py`` / ``triton_matmul.py``: the CUDA kernels (Triton).

Every kernel has a PyTorch reference it is tested against bit for bit, and the reference runs
wherever a kernel is missing. ``QLORA_DISABLE_KERNELS`` set to anything but ``""`` or ``"0"``
forces the references everywhere, C and Triton alike; it is read on every call, so setting it
after import takes effect at the next call.
"""

from __future__ import annotations

import importlib
import os
from functools import cache
from types import ModuleType

__all__ = ["C_EXTENSIONS", "c_extension", "describe", "kernels_disabled", "triton_enabled"]

DISABLE_VARIABLE = "QLORA_DISABLE_KERNELS"
# short name -> what it holds; the module is qlora.kernels._<name> (pyproject ext-modules)
C_EXTENSIONS = {
    "cpu": "blockwise dequantize/quantize, fused 8-bit AdamW",
    "ops": "counter-based dropout",
    "gguf": "GGUF block dequantize (Q4_0 ... Q6_K), bit-identical to the gguf package",
    "matvec": "fused dequantize + skinny matmul for decoding (few rows)",
    "decode": "a decode step's per-layer glue: RMSNorm, rotary + KV write + attention, SwiGLU",
}


def kernels_disabled() -> bool:
    """Whether ``QLORA_DISABLE_KERNELS`` asks for the reference paths (read now, every call)."""
    return os.environ.get(DISABLE_VARIABLE, "") not in ("", "0")


@cache
def _import_extension(name: str) -> ModuleType | None:
    # cached: an import attempt that failed is not retried on every dequantize call
    try:
        return importlib.import_module(f"qlora.kernels._{name}")
    except ImportError:
        return None


def c_extension(name: str) -> ModuleType | None:
    """The compiled extension ``qlora.kernels._<name>`` (a key of ``C_EXTENSIONS``), or None
    when it was not built or kernels are disabled."""
    if name not in C_EXTENSIONS:
        raise ValueError(f"unknown C extension {name!r}; choose one of {sorted(C_EXTENSIONS)}")
    if kernels_disabled():
        return None
    return _import_extension(name)


@cache
def _triton_installed() -> bool:
    from qlora.kernels.triton_dequant import available  # imports torch and triton: lazily

    return available()


def triton_enabled() -> bool:
    """Whether the Triton kernels may be used: triton installed and kernels not disabled."""
    return not kernels_disabled() and _triton_installed()


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _describe_c() -> dict[str, str]:
    built = [name for name in C_EXTENSIONS if _import_extension(name) is not None]
    missing = [name for name in C_EXTENSIONS if name not in built]
    if not built:
        state = "not built (reference paths; needs a C compiler at install)"
    else:
        state = "built: " + ", ".join(built)
        state += f"; not built: {', '.join(missing)}" if missing else ""
    if kernels_disabled():
        state += f" - disabled by {DISABLE_VARIABLE} (reference paths)"
    cpu = _import_extension("cpu")
    rows = {"c kernels": state, "cpu dequant kernel": "not built (reference path)"}
    if cpu is not None:  # the path it takes on this CPU (chosen at run time)
        rows["cpu dequant kernel"] = "avx2" if cpu.has_avx2() else "scalar (no AVX2 on this CPU)"
    flags = _cpu_flags()
    # AVX2 and (matvec) AVX-512 paths are ours; avx512_bf16 matters for peers (bitsandbytes)
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16")
    rows["cpu features"] = " ".join(f for f in wanted if f in flags) or "unknown"
    return rows


def _describe_triton() -> str:
    if not _triton_installed():
        return "not installed (CUDA uses the PyTorch reference dequantize)"
    import triton

    if kernels_disabled():
        return f"{triton.__version__}, disabled by {DISABLE_VARIABLE}"
    return f"{triton.__version__}, enabled (used on CUDA devices)"


def describe() -> dict[str, str]:
    """Rows for ``qlora env``: which kernels are built, enabled and which CPU paths they take."""
    return {**_describe_c(), "triton kernels": _describe_triton()}
