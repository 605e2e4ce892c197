"""The training loop and its pieces (the chunked loss)."""

from qlora.train.loss import causal_lm_loss, chunked_cross_entropy, reference_cross_entropy

__all__ = ["causal_lm_loss", "chunked_cross_entropy", "reference_cross_entropy"]
