"""The next token from a row of logits: greedy, or temperature then top-p, as transformers'
``generate`` samples (the order its logits processors apply them)."""

from __future__ import annotations

import torch

__all__ = ["sample_next"]


def sample_next(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator
) -> int:
    """The next token from logits [V]: argmax when temperature is 0, else a draw from the
    temperature-scaled softmax restricted to the top-p nucleus (the most likely token is
    always kept)."""
    if temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # [V]
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)  # [V], [V]
        # Drop a token when the tokens before it already reach top_p.
        drop = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))
