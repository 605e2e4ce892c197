"""Layers: the frozen k-bit `QuantLinear`, the `LoRALinear` adapter wrapper, and the model
surgery that puts them in place (target selection, wrapping, freezing, merging), and the
LoftQ initialization of adapters over a quantized base."""

from qlora.nn.inject import (
    TrainableReport,
    add_lora,
    disable_adapters,
    find_targets,
    lora_layers,
    merge,
    quantize_model,
    replace_module,
    set_adapter,
    trainable_report,
)
from qlora.nn.loftq import LoftQReport, LoftQResult, init_loftq, loftq_decompose
from qlora.nn.lora import (
    LoRALinear,
    base_weight_dtype,
    delta_weight,
    merge_adapter,
    merged_weight,
    unmerge_adapter,
)
from qlora.nn.qlinear import QuantLinear, fast_decoding

__all__ = [
    "LoRALinear",
    "LoftQReport",
    "LoftQResult",
    "QuantLinear",
    "TrainableReport",
    "add_lora",
    "base_weight_dtype",
    "delta_weight",
    "disable_adapters",
    "fast_decoding",
    "find_targets",
    "init_loftq",
    "loftq_decompose",
    "lora_layers",
    "merge",
    "merge_adapter",
    "merged_weight",
    "quantize_model",
    "replace_module",
    "set_adapter",
    "trainable_report",
    "unmerge_adapter",
]
