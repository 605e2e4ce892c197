"""Where a model directory may be written: the rule that keeps a user's files.

`save_quantized` (``qlora quantize``), `export_merged` (``qlora merge``) and, for its own
two files, `save_adapter` write whole model directories. Before any of them writes:

* never the directory the model was loaded from, ``overwrite`` or not: replacing its
  files would lose the model being exported (`source_directories` says where that is);
* an existing directory that holds anything is refused unless ``overwrite``; with it,
  only the files written now are replaced and every other file stays;
* never beside files a loader would read with or instead of the new ones (old shards, an
  adapter beside a merged model): they may be the user's, so they are named, not deleted.

The files then go through `qlora.files.staged_directory`, which re-checks the last rule
with the full list of files (tokenizer files vary) just before anything moves.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from qlora.files import DestinationError, check_destination, check_stale, refuse_source

__all__ = [
    "FULL_MODEL_FILES",
    "MODEL_FILES",
    "WEIGHT_FILES",
    "check_model_destination",
    "check_output_directory",
    "refuse_model_directory",
    "source_directories",
]

# Files a loader (transformers, PEFT, ours) reads from a model directory besides config.json.
# One of these left beside a model we write would be read with or instead of it.
WEIGHT_FILES = (
    "model*.safetensors",
    "*.safetensors.index.json",
    "pytorch_model*.bin",
    "*.bin.index.json",
    "tf_model.h5",
    "flax_model.msgpack",
    "adapter_config.json",
    "adapter_model.*",
)
MODEL_FILES = (
    *WEIGHT_FILES,
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "chat_template.*",
)
# config.json and a full model's weights: what makes a directory a model, not an adapter.
FULL_MODEL_FILES = ("config.json", *(p for p in WEIGHT_FILES if not p.startswith("adapter")))
_WRITES = ("config.json", "model.safetensors")  # always; tokenizer files and the rest vary


def source_directories(model: nn.Module) -> list[Path]:
    """Directories ``model`` was read from: `load_model`'s record, transformers' name."""
    found: list[Path] = []
    info = getattr(model, "qlora_load_info", None)
    if info is not None:
        found.append(Path(info.directory))
        found.extend(Path(shard).parent for shard in getattr(info, "shards", ()))
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    if name and Path(str(name)).is_dir():
        found.append(Path(str(name)))
    return list(dict.fromkeys(found))


def check_output_directory(
    directory: str | os.PathLike, overwrite: bool, sources: Sequence[str | os.PathLike] = ()
) -> None:
    """The destination checks that need no model - cheap, so a CLI runs them before loading.

    ``sources``: the model paths the command will read (refused as a destination, overwrite
    or not; `check_model_destination` checks again with what the loader recorded).

    Refused: a non-empty directory (unless ``overwrite``), and weights or adapters that
    would stay beside the new model (always; `save_quantized` / `export_merged` check
    tokenizer and generation files too, once they know which they write).

    Raises:
        qlora.files.DestinationError: naming the directory and the way out.
    """
    refuse_source(directory, [s for s in sources if Path(s).is_dir()], "the base model")
    check_destination(directory, overwrite=overwrite)
    check_stale(directory, _WRITES, WEIGHT_FILES)


def check_model_destination(
    directory: str | os.PathLike, model: nn.Module, overwrite: bool, what: str = "the model"
) -> None:
    """`check_output_directory`, and never the directory ``model`` was loaded from.

    Raises:
        qlora.files.DestinationError: naming the directory and the way out.
    """
    refuse_source(directory, source_directories(model), what)
    check_output_directory(directory, overwrite)


def refuse_model_directory(directory: str | os.PathLike, what: str) -> None:
    """Refuse to write ``what`` into a directory that holds a full model, overwrite or not.

    Raises:
        qlora.files.DestinationError: naming the model files found.
    """
    path = Path(directory)
    if not path.is_dir():
        return
    found = sorted(
        p.name
        for p in path.iterdir()
        if any(fnmatch.fnmatchcase(p.name, pattern) for pattern in FULL_MODEL_FILES)
    )
    if found:
        raise DestinationError(
            f"{path} holds a model ({', '.join(found[:3])}): {what} written beside it would "
            "change what from_pretrained loads from there, --overwrite or not; choose "
            "another directory"
        )
