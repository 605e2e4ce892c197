"""Tiny random Hugging Face models for tests (no download): one builder, shared."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def tiny_llama(
    *,
    hidden: int = 64,
    intermediate: int = 128,
    vocab: int = 128,
    tied: bool = False,
    seed: int | None = None,
    layers: int = 2,
    **config: Any,
) -> nn.Module:
    """A random ``LlamaForCausalLM`` (2 layers by default; 4 heads, 2 KV heads) in eval mode.

    Args:
        hidden, intermediate, vocab: the sizes.
        tied: tie the output head to the embedding.
        seed: reseed torch's RNG before the weights are drawn (None: use its current state).
        config: any other ``LlamaConfig`` field (``attention_bias``, ``attn_implementation``...).
    """
    import transformers

    llama_config = transformers.LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        tie_word_embeddings=tied,
        **config,
    )
    if seed is not None:
        torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(llama_config).eval()


def tiny_causal_lm(arch: str, *, vocab: int = 128, seed: int = 0, **config: Any) -> nn.Module:
    """A 2-layer random transformers ``{arch}ForCausalLM`` (hidden 64, 4 heads, 2 KV heads)
    in eval mode, for architectures that share Llama's config fields ("Llama", "Qwen2",
    "Mistral" ...); ``config``: any other field of its config."""
    import transformers

    model_config = getattr(transformers, f"{arch}Config")(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        **config,
    )
    torch.manual_seed(seed)
    return getattr(transformers, f"{arch}ForCausalLM")(model_config).eval()


def with_two_adapters(model: nn.Module) -> nn.Module:
    """``model`` with adapters "a" (r=4) and "b" (r=8) on every linear layer, their B drawn
    at random (seeded) so that each changes the output: for mixed-adapter batch tests."""
    from qlora import LoraConfig, add_lora
    from qlora.nn import lora_layers

    add_lora(model, LoraConfig(r=4, alpha=8.0, dropout=0.0), adapter_name="a")
    add_lora(model, LoraConfig(r=8, alpha=8.0, dropout=0.0), adapter_name="b")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for name in ("a", "b"):
                weight = layer.lora_B[name].weight  # [out, r]
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.2)
    return model
