"""qlora: fine-tune large language models with LoRA and QLoRA on the hardware you have.

The public API (see DESIGN.md §3); everything else is internal and may change.
"""

from qlora.adapters import convert_adapter, export_merged, load_adapter, save_adapter
from qlora.config import (
    ConfigError,
    DataConfig,
    LoraConfig,
    ModelConfig,
    QuantConfig,
    RunConfig,
    TrainConfig,
)
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
from qlora.train import TrainingError, TrainResult, evaluate, train

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DataConfig",
    "LoRALinear",
    "LoraConfig",
    "ModelConfig",
    "ModelLoadError",
    "QuantConfig",
    "QuantLinear",
    "QuantState",
    "RunConfig",
    "TrainConfig",
    "TrainResult",
    "TrainableReport",
    "TrainingError",
    "__version__",
    "add_lora",
    "convert_adapter",
    "dequantize",
    "disable_adapters",
    "evaluate",
    "export_gguf",
    "export_merged",
    "load_adapter",
    "load_model",
    "merge",
    "quantize",
    "quantize_model",
    "save_adapter",
    "set_adapter",
    "train",
    "trainable_report",
]


def __getattr__(name: str) -> object:
    # qlora.export imports the gguf package (~0.15 s): only when export_gguf is asked for
    if name == "export_gguf":
        from qlora.export import export_gguf

        return export_gguf
    raise AttributeError(f"module 'qlora' has no attribute {name!r}")
