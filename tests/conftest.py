"""Shared test configuration: deterministic seeds and peer-library availability."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

# Without a GPU, Triton kernels are tested on the CPU by Triton's interpreter. The variable
# must be set before triton.jit decorates anything, i.e. before our kernels are imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


requires_bnb = pytest.mark.skipif(
    not has_module("bitsandbytes"), reason="needs bitsandbytes (extra compat)"
)
requires_triton = pytest.mark.skipif(not has_module("triton"), reason="needs triton (extra triton)")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
