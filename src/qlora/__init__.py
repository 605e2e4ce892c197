"""qlora: fine-tune large language models with LoRA and QLoRA on the hardware you have.

The public API (see DESIGN.md §3); everything else is internal and may change.
"""

from qlora.config import ConfigError, LoraConfig, QuantConfig
from qlora.models import ModelLoadError, load_model
from qlora.nn import (
    LoRALinear,
    QuantLinear,
    TrainableReport,
    add_lora,
    disable_adapters,
    merge,
    quantize_model,
    set_adapter,
    trainable_report,
)
from qlora.quant import QuantState, dequantize, quantize

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "LoRALinear",
    "LoraConfig",
    "ModelLoadError",
    "QuantConfig",
    "QuantLinear",
    "QuantState",
    "TrainableReport",
    "__version__",
    "add_lora",
    "dequantize",
    "disable_adapters",
    "load_model",
    "merge",
    "quantize",
    "quantize_model",
    "set_adapter",
    "trainable_report",
]
