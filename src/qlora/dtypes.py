"""The floating-point dtypes a user can name, and the one map from those names to torch.

Config files, the command line and saved metadata spell dtypes as strings ("bfloat16"); every
module that turns such a string into a ``torch.dtype`` (or back) goes through here, so the list
of choices and the map exist once.
"""

from __future__ import annotations

import typing
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

__all__ = ["DTYPE_NAMES", "DtypeName", "dtype_bytes", "dtype_name", "torch_dtype"]

DtypeName = Literal["float32", "bfloat16", "float16"]
DTYPE_NAMES: tuple[str, ...] = typing.get_args(DtypeName)


def torch_dtype(name: str) -> torch.dtype:
    """The ``torch.dtype`` called ``name`` ("float32", "bfloat16" or "float16").

    Raises:
        ValueError: any other name; the message lists the valid ones.
    """
    import torch  # here, so that importing the names (qlora.config does) stays cheap

    if name not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPE_NAMES)}")
    return getattr(torch, name)


def dtype_name(dtype: torch.dtype) -> str:
    """The name of ``dtype`` (``torch.bfloat16`` -> "bfloat16"); ValueError for any other."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_NAMES:
        raise ValueError(f"unsupported dtype {dtype}; choose one of {', '.join(DTYPE_NAMES)}")
    return name


def dtype_bytes(name: str) -> int:
    """Bytes per element of the dtype called ``name`` (4 for float32, 2 for the 16-bit ones)."""
    return torch_dtype(name).itemsize
