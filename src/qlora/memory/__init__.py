"""How much memory does a fine-tuning step need? `estimate` predicts the peak memory of one
step (weights, adapters, gradients, optimizer states, activations, logits, working memory).

The derivation, op by op, is the docstring of `qlora.memory.activations`; `shapes` holds
the model architectures and setting names, `estimate` the parameter accounting and the sum,
`tables` the Markdown tables (ours beside the published rule of thumb).
"""

from qlora.memory.activations import SavedTensor, layer_saved_tensors
from qlora.memory.estimate import GiB as GiB
from qlora.memory.estimate import MemoryEstimate, estimate, quant_storage, quantized_bytes
from qlora.memory.shapes import (
    METHODS,
    OPTIMIZERS,
    SIZES,
    Attention,
    ComputeDtype,
    Device,
    Method,
    ModelShape,
    Optimizer,
    model_shape,
)
from qlora.memory.tables import (
    COMPARE_SETTINGS,
    PUBLISHED_TABLE,
    TABLE_SIZES,
    compare_table,
    sizes_table,
)

__all__ = [
    "COMPARE_SETTINGS",
    "METHODS",
    "OPTIMIZERS",
    "PUBLISHED_TABLE",
    "SIZES",
    "TABLE_SIZES",
    "Attention",
    "ComputeDtype",
    "Device",
    "MemoryEstimate",
    "Method",
    "ModelShape",
    "Optimizer",
    "SavedTensor",
    "compare_table",
    "estimate",
    "layer_saved_tensors",
    "model_shape",
    "quant_storage",
    "quantized_bytes",
    "sizes_table",
]
