"""The frozen base straight from a GGUF file's own blocks (``quant.kind: gguf``).

Loading a ``.gguf`` with a codebook (``nf4``) rounds its weights twice: the file's blocks are
dequantized to float32 (that is the model llama.cpp runs) and then re-quantized to NF4 on
another grid, so the adapter trains against weights nobody deploys. ``quant.kind: gguf``
keeps each target Linear's bytes exactly as the file stores them - Q4_0, Q4_1, Q8_0, the
K-quants - in a `QuantState` of that block kind, and every forward dequantizes them with
`qlora.quant.gguf_blocks` (bit-identical to ``gguf.quants.dequantize``, which is how the
float32 model is made). The adapter then trains on exactly the weights llama.cpp multiplies
by, and its adapter GGUF on the original file reproduces training-time behaviour.

Two facts make the bytes usable as they are:

* GGUF blocks run along a row (the input dimension), so a row of the [out, in] weight is a
  whole number of blocks: a row permutation of the weight is a row permutation of the
  [out, row_bytes] byte matrix. llama.cpp's q/k rope permutation is undone that way,
  exactly (`qlora.models.gguf_names.unpermute_qk` on bytes).
* The tensor names map one to one onto the architecture's (`gguf_names.gguf_tensor_name`).

Tensors the file keeps in F32 / F16 (norms; sometimes a small projection) or in a block type
`qlora.quant.gguf_blocks` does not read stay in full precision, as transformers dequantized
them; the loader says which.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qlora.models.gguf_names import (
    UnsupportedArchitectureError,
    gguf_arch,
    gguf_tensor_name,
    qk_heads,
    unpermute_qk,
)
from qlora.models.registry import ModelLoadError, registered_path
from qlora.quant.gguf_blocks import gguf_kind, row_bytes
from qlora.quant.state import QuantState

__all__ = ["GGUFBase", "gguf_file"]


def gguf_file(source: str | os.PathLike) -> Path | None:
    """The ``.gguf`` file behind ``source`` (a path or a registered name), or None."""
    path = Path(source).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path
    registered = registered_path(str(source))
    if registered is not None and registered.suffix.lower() == ".gguf":
        return registered
    return None


class GGUFBase:
    """The tensors of one GGUF file, looked up by Hugging Face name, as `QuantState`s.

    Args:
        path: the ``.gguf`` file.
        config: the transformers config of the model it holds (its architecture and heads).
    """

    def __init__(self, path: Path, config: Any) -> None:
        import gguf

        self.path = path
        try:
            self.arch = gguf_arch(config)
        except UnsupportedArchitectureError as err:
            raise ModelLoadError(f"quant='gguf': {err}") from None
        try:
            reader = gguf.GGUFReader(path)  # memory-mapped: nothing is read yet
        except (ValueError, OSError) as err:
            raise ModelLoadError(f"{path}: not a readable GGUF file ({err})") from None
        self.tensors = {t.name: t for t in reader.tensors}
        self.n_layers = int(config.num_hidden_layers)
        self.n_head = int(config.num_attention_heads)
        self.n_kv = int(getattr(config, "num_key_value_heads", None) or self.n_head)
        self.kept: Counter[str] = Counter()  # block kind -> layers kept as the file has them
        self.full_precision: Counter[str] = Counter()  # file type -> layers not kept

    def state(self, hf_name: str, shape: torch.Size, device: torch.device) -> QuantState | None:
        """The file's blocks for weight ``hf_name`` [out, in] (q/k rows back in HF order), or
        None when the file stores it unquantized or in a block type not read here."""
        name = gguf_tensor_name(hf_name, self.arch, self.n_layers)
        tensor = self.tensors.get(name)
        if tensor is None:
            raise ModelLoadError(
                f"{self.path}: no tensor {name!r} for {hf_name}; does the file belong to "
                "this model?"
            )
        kind = gguf_kind(tensor.tensor_type)
        if kind is None:
            self.full_precision[tensor.tensor_type.name] += 1
            return None
        rows, columns = int(shape[0]), int(shape[1])
        data = tensor.data  # uint8 [rows, row_bytes], memory-mapped
        if tuple(data.shape) != (rows, row_bytes(kind, columns)):
            raise ModelLoadError(
                f"{self.path}: {name} holds {tuple(data.shape)} bytes of {kind} but "
                f"{hf_name} is {tuple(shape)}; does the file belong to this model?"
            )
        blocks = torch.from_numpy(np.array(data, dtype=np.uint8))  # a copy off the map
        heads = qk_heads(hf_name, self.arch, self.n_head, self.n_kv)
        if heads is not None:  # whole rows move: exact
            blocks = unpermute_qk(blocks, heads).contiguous()
        self.kept[kind] += 1
        return QuantState.from_gguf_blocks(blocks.to(device), kind, shape)

    def summary(self) -> str:
        """One line: which block kinds were kept, and what stays in full precision."""
        kept = ", ".join(f"{n} {k}" for k, n in sorted(self.kept.items())) or "none"
        line = f"kept the GGUF's own blocks for {sum(self.kept.values())} layers ({kept})"
        if self.full_precision:
            other = ", ".join(f"{n} {k}" for k, n in sorted(self.full_precision.items()))
            line += f"; in full precision (not a block type read here): {other}"
        return line
