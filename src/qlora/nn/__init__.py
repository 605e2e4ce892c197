"""Layers: the frozen k-bit `QuantLinear`, the `LoRALinear` adapter wrapper, and the model
surgery that puts them in place (target selection, wrapping, freezing, merging), and the
LoftQ and PiSSA initializations of adapters (DoRA lives in `LoRALinear`)."""

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
from qlora.nn.pissa import PissaReport, PissaSplit, init_pissa, pissa_split, pissa_to_lora
from qlora.nn.qlinear import QuantLinear, fast_decoding

__all__ = [
    "LoRALinear",
    "LoftQReport",
    "LoftQResult",
    "PissaReport",
    "PissaSplit",
    "QuantLinear",
    "TrainableReport",
    "add_lora",
    "base_weight_dtype",
    "delta_weight",
    "disable_adapters",
    "fast_decoding",
    "find_targets",
    "init_loftq",
    "init_pissa",
    "loftq_decompose",
    "lora_layers",
    "merge",
    "merge_adapter",
    "merged_weight",
    "pissa_split",
    "pissa_to_lora",
    "quantize_model",
    "replace_module",
    "set_adapter",
    "trainable_report",
    "unmerge_adapter",
]
