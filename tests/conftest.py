"""Shared test configuration: deterministic seeds and peer-library availability."""

from __future__ import annotations

import importlib.util

import pytest
import torch


def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


requires_bnb = pytest.mark.skipif(
    not has_module("bitsandbytes"), reason="needs bitsandbytes (extra compat)"
)
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
