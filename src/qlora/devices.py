"""Device names a user can give ("auto", "cpu", "cuda", "cuda:N"): the one check of them.

The config checks ``model.device`` at parse time and `load_model` checks its ``device``
argument with the same function, each naming its own key in the message.
"""

from __future__ import annotations

import re

import torch

__all__ = ["DeviceError", "resolve_device"]


class DeviceError(ValueError):
    """A device that is not a device name, or is not on this machine; says what to use."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The device for ``device`` ("auto": CUDA when available, else the CPU).

    Raises:
        DeviceError: a name that is not auto / cpu / cuda / cuda:N, CUDA asked for where there
            is none, or a CUDA index past the last visible GPU.
    """
    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if match is None:
        raise DeviceError(f"{name!r} is not a device name; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else "no GPU is visible"
        raise DeviceError(
            f"{name!r} but CUDA is not available here (torch {torch.__version__}, {build}); "
            "use cpu or auto (CUDA when there is one)"
        )
    count = torch.cuda.device_count()
    if int(match.group(1) or 0) >= count:
        raise DeviceError(
            f"{name!r} but only {count} CUDA device(s) are visible (cuda:0..cuda:{count - 1}); "
            "choose one of them, cpu or auto (check CUDA_VISIBLE_DEVICES)"
        )
    return torch.device(name)
