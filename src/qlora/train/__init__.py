"""The training loop and its pieces: the chunked loss, schedules, checkpoints."""

from qlora.train.loss import causal_lm_loss, chunked_cross_entropy, reference_cross_entropy
from qlora.train.trainer import TrainingError, TrainResult, evaluate, train

__all__ = [
    "TrainResult",
    "TrainingError",
    "causal_lm_loss",
    "chunked_cross_entropy",
    "evaluate",
    "reference_cross_entropy",
    "train",
]
