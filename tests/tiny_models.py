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
    **config: Any,
) -> nn.Module:
    """A 2-layer random ``LlamaForCausalLM`` (4 heads, 2 KV heads) in eval mode.

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
        num_hidden_layers=2,
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
