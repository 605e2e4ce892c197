"""Export to GGUF for llama.cpp and Ollama (layer 8 in docs/architecture.md).

`export_gguf` writes a model with its adapters merged as one ``.gguf`` file;
`qlora.models.gguf_names` holds the HF -> llama.cpp tensor names and the q/k permutation
that every GGUF writer here shares; `fidelity_report` reads an export back and compares it
with our own forward; `adapter_fidelity_report` does the same for a LoRA adapter GGUF,
applied to its base as llama.cpp applies it.
"""

from qlora.export.fidelity import (
    FidelityReport,
    adapter_fidelity_report,
    fidelity_report,
    read_fidelity_report,
    write_fidelity_report,
)
from qlora.export.gguf_model import GGUF_TYPES, GGUFExportError, export_gguf
from qlora.export.tokenizer_meta import TokenizerError
from qlora.models.gguf_names import UnsupportedArchitectureError

__all__ = [
    "GGUF_TYPES",
    "FidelityReport",
    "GGUFExportError",
    "TokenizerError",
    "UnsupportedArchitectureError",
    "adapter_fidelity_report",
    "export_gguf",
    "fidelity_report",
    "read_fidelity_report",
    "write_fidelity_report",
]
