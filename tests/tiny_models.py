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
