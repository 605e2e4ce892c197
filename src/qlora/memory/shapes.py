"""The estimator's inputs: model architectures (`ModelShape`, the `SIZES` presets,
`model_shape` for a size, a ``config.json`` or an ``nn.Module``) and the names of the
settings (methods, optimizers, dtypes, devices, attention implementations).
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from torch import nn

from qlora.config import ConfigError
from qlora.dtypes import DtypeName
from qlora.optim.build import OptimizerName

Method = Literal["full-amp", "full-16", "lora-16", "qlora-8", "qlora-4", "qlora-2"]
# The trainer's optimizers (qlora.optim owns the names), plus plain SGD, which the trainer
# does not offer: it keeps no state, so its estimate is the lower bound of the optimizer term
# that the others are compared with.
Optimizer = Literal[OptimizerName, "sgd"]
ComputeDtype = DtypeName
Device = Literal["cuda", "cpu"]
Attention = Literal["sdpa", "eager"]

METHODS: tuple[str, ...] = typing.get_args(Method)
OPTIMIZERS: tuple[str, ...] = typing.get_args(Optimizer)


@dataclass(frozen=True)
class ModelShape:
    """The shapes of a Llama-style decoder (dense or mixture-of-experts).

    Attributes:
        name: what the shape is (e.g. "Llama-2-7B").
        hidden: hidden size h.
        intermediate: MLP (per expert) intermediate size i.
        layers: decoder layers L.
        heads: query heads n_q.
        kv_heads: key/value heads n_kv (grouped-query attention when < heads).
        vocab: vocabulary size V.
        tied_embeddings: the output head shares the input embedding's weight.
        experts: experts per MoE layer (1: a dense MLP).
        active_experts: experts each token is routed to (top-K).
        head_dim: per-head size d; 0 means hidden // heads.
    """

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool = False
    experts: int = 1
    active_experts: int = 1
    head_dim: int = 0

    @property
    def d(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def q_dim(self) -> int:
        return self.heads * self.d

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.d

    @property
    def is_moe(self) -> bool:
        return self.experts > 1

    def layer_linears(self) -> list[tuple[str, int, int]]:
        """(name, in, out) of every linear layer of one decoder layer (experts unrolled)."""
        h, i = self.hidden, self.intermediate
        linears = [
            ("q_proj", h, self.q_dim),
            ("k_proj", h, self.kv_dim),
            ("v_proj", h, self.kv_dim),
            ("o_proj", self.q_dim, h),
        ]
        mlp = [("gate_proj", h, i), ("up_proj", h, i), ("down_proj", i, h)]
        if self.is_moe:
            linears.append(("router", h, self.experts))
            for e in range(self.experts):
                linears += [(f"experts.{e}.{n}", n_in, n_out) for n, n_in, n_out in mlp]
        else:
            linears += mlp
        return linears

    def linear_params(self) -> int:
        """Parameters in the decoder layers' linear layers (what QLoRA quantizes)."""
        return self.layers * sum(n_in * n_out for _, n_in, n_out in self.layer_linears())

    def other_params(self) -> int:
        """Embedding, output head (unless tied) and RMSNorm weights; biases are ignored."""
        embed = self.vocab * self.hidden
        head = 0 if self.tied_embeddings else self.vocab * self.hidden
        norms = (2 * self.layers + 1) * self.hidden
        return embed + head + norms

    def params(self) -> int:
        return self.linear_params() + self.other_params()

    def lora_params(self, rank: int) -> int:
        """r·(in + out) per adapted linear layer: all of them but the output head."""
        return self.layers * sum(rank * (n_in + n_out) for _, n_in, n_out in self.layer_linears())

    @classmethod
    def from_config(cls, config: dict[str, Any], name: str = "config") -> ModelShape:
        """Read a Hugging Face ``config.json`` mapping (``text_config`` of multimodal ones)."""
        if isinstance(config.get("text_config"), dict):
            config = config["text_config"]
        required = (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "vocab_size",
        )
        missing = [key for key in required if config.get(key) is None]
        if missing:
            raise ConfigError(
                f"{name}: missing {', '.join(missing)}; a Llama-style config.json needs "
                f"{', '.join(required)}"
            )
        heads = int(config["num_attention_heads"])
        experts = config.get("num_local_experts") or config.get("num_experts") or 1
        return cls(
            name=str(config.get("_name_or_path") or config.get("model_type") or name),
            hidden=int(config["hidden_size"]),
            intermediate=int(config["intermediate_size"]),
            layers=int(config["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            vocab=int(config["vocab_size"]),
            tied_embeddings=bool(config.get("tie_word_embeddings", False)),
            experts=int(experts),
            active_experts=int(config.get("num_experts_per_tok") or 1) if experts > 1 else 1,
            head_dim=int(config.get("head_dim") or 0),
        )


# Published architecture shapes (the models' config.json files).
_LLAMA1_33B = ModelShape('LLaMA-33B ("30B")', 6656, 17920, 60, 52, 52, 32000)
SIZES: dict[str, ModelShape] = {
    "135m": ModelShape("SmolLM2-135M", 576, 1536, 30, 9, 3, 49152, tied_embeddings=True),
    "360m": ModelShape("SmolLM2-360M", 960, 2560, 32, 15, 5, 49152, tied_embeddings=True),
    "1.7b": ModelShape("SmolLM2-1.7B", 2048, 8192, 24, 32, 32, 49152, tied_embeddings=True),
    "7b": ModelShape("Llama-2-7B", 4096, 11008, 32, 32, 32, 32000),
    "8b": ModelShape("Llama-3-8B", 4096, 14336, 32, 32, 8, 128256),
    "13b": ModelShape("Llama-2-13B", 5120, 13824, 40, 40, 40, 32000),
    "30b": _LLAMA1_33B,
    "33b": _LLAMA1_33B,
    "65b": ModelShape("LLaMA-65B", 8192, 22016, 80, 64, 64, 32000),
    "70b": ModelShape("Llama-2-70B", 8192, 28672, 80, 64, 8, 32000),
    "110b": ModelShape("Qwen1.5-110B", 8192, 49152, 80, 64, 8, 152064),
    "8x7b": ModelShape("Mixtral-8x7B", 4096, 14336, 32, 32, 8, 32000, experts=8, active_experts=2),
    "8x22b": ModelShape(
        "Mixtral-8x22B", 6144, 16384, 56, 48, 8, 32768, experts=8, active_experts=2
    ),
}


def model_shape(model: str | os.PathLike[str] | ModelShape | nn.Module) -> ModelShape:
    """The architecture of ``model``: a size ("7b", "8x7b", ...), a ``config.json`` (or a
    directory holding one), a `ModelShape`, or a module (its ``config``, else its layers).

    Raises:
        ConfigError: unknown size, missing or unreadable config.json, or a module whose shapes
            cannot be inferred; the message names the value and the valid choices.
    """
    if isinstance(model, ModelShape):
        return model
    if isinstance(model, nn.Module):
        return _module_shape(model)
    text = os.fspath(model)
    if text.lower() in SIZES:
        return SIZES[text.lower()]
    path = Path(text)
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path.parent}: no config.json in this directory")
    if not path.is_file():
        raise ConfigError(
            f"unknown model {text!r}: not a size ({', '.join(SIZES)}) "
            "nor an existing config.json or model directory"
        )
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: cannot read it as JSON ({err})") from err
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return ModelShape.from_config(config, name=str(path))


def _module_shape(model: nn.Module) -> ModelShape:
    config = getattr(model, "config", None)
    if config is not None:
        values = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
        shape = ModelShape.from_config(values, name=type(model).__name__)
        return dataclasses.replace(shape, name=str(values.get("_name_or_path") or shape.name))
    # No config: read the Llama-style module names. Heads are not recoverable from weights;
    # 64-wide heads are assumed (only the log-sum-exp term depends on them).
    first: dict[str, nn.Module] = {}
    layers = 0
    embedding = None
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "q_proj":
            layers += 1
        if leaf in ("q_proj", "k_proj", "gate_proj") and leaf not in first:
            first[leaf] = module
        if isinstance(module, nn.Embedding) and embedding is None:
            embedding = module
    if not layers or embedding is None or len(first) < 3:
        raise ConfigError(
            f"cannot infer the architecture of {type(model).__name__}: it has no .config and "
            "no Llama-style q_proj/k_proj/gate_proj layers; pass a config.json or a size"
        )
    hidden = int(first["q_proj"].in_features)
    heads = max(1, int(first["q_proj"].out_features) // 64)
    head = getattr(model, "get_output_embeddings", lambda: None)()
    return ModelShape(
        name=type(model).__name__,
        hidden=hidden,
        intermediate=int(first["gate_proj"].out_features),
        layers=layers,
        heads=heads,
        kv_heads=max(1, int(first["k_proj"].out_features) // 64),
        vocab=int(embedding.num_embeddings),
        tied_embeddings=head is not None and head.weight is embedding.weight,
        head_dim=64,
    )
