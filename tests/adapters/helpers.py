"""Shared pieces for the adapter tests: tiny models with non-zero adapters, logits, ids."""

from __future__ import annotations

import torch
from torch import nn

from qlora.config import LoraConfig
from qlora.nn import add_lora, lora_layers
from tests.tiny_models import tiny_llama

VOCAB = 128
PROJECTIONS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def input_ids() -> torch.Tensor:
    """[2, 9] token ids, the same on every call."""
    return torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))


def randomize(model: nn.Module, adapter: str = "default", seed: int = 0) -> nn.Module:
    """Give ``adapter``'s B (zero after init) and A random values so it changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            if adapter in layer.lora_A:
                for weight in (layer.lora_A[adapter].weight, layer.lora_B[adapter].weight):
                    weight.copy_(torch.randn(weight.shape, generator=generator) * 0.2)
    return model


def adapted_llama(
    seed: int = 0, adapter_seed: int = 0, tied: bool = False, **lora: object
) -> nn.Module:
    """tiny_llama(seed) with a randomized LoRA adapter "default" (r=4, alpha=8 unless given)."""
    config = LoraConfig(**{"r": 4, "alpha": 8.0, "dropout": 0.0, **lora})  # type: ignore[arg-type]
    model = add_lora(tiny_llama(seed=seed, tied=tied), config)
    return randomize(model, seed=adapter_seed)


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor | None = None) -> torch.Tensor:
    return model(input_ids=input_ids() if ids is None else ids).logits.float()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach() - b.detach()).abs().max())
