"""Adapter files and merged exports: PEFT-compatible save/load, merge into a plain checkpoint."""

from qlora.adapters.merge import (
    ExportError,
    ExportReport,
    export_merged,
    measure_drift,
    merged_state_dict,
)
from qlora.adapters.peft_format import (
    AdapterFormatError,
    AdapterNotFoundError,
    adapter_config,
    convert_adapter,
    load_adapter,
    read_adapter,
    save_adapter,
)

__all__ = [
    "AdapterFormatError",
    "AdapterNotFoundError",
    "ExportError",
    "ExportReport",
    "adapter_config",
    "convert_adapter",
    "export_merged",
    "load_adapter",
    "measure_drift",
    "merged_state_dict",
    "read_adapter",
    "save_adapter",
]
