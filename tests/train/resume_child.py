"""A training run for the kill-and-resume test, run as a subprocess:

    python -m tests.train.resume_child OUTPUT_DIR [--kill-at-batch N] [--interrupt-at-batch N]
        [--resume] [--optim O]

The data object SIGKILLs (or SIGINTs, as Ctrl-C does) its own process when batch N is
requested (mid-run, after some checkpoints), exactly as a user's kill -9 (or Ctrl-C) would.
"""

from __future__ import annotations

import argparse
import os
import signal

import torch

from qlora import LoraConfig, add_lora
from qlora.config import TrainConfig
from qlora.train.trainer import TrainingError, train
from tests.tiny_models import tiny_llama

VOCAB = 96


class Data:
    def __init__(self, kill_at: int | None, interrupt_at: int | None = None) -> None:
        gen = torch.Generator().manual_seed(123)
        self.pool = [torch.randint(0, VOCAB, (2, 12), generator=gen) for _ in range(6)]
        self.kill_at = kill_at
        self.interrupt_at = interrupt_at
        self.served = 0

    def epoch(self, epoch: int) -> list[dict[str, torch.Tensor]]:
        order = torch.randperm(len(self.pool), generator=torch.Generator().manual_seed(epoch))
        return [_Lazy(self, int(i)) for i in order]  # type: ignore[misc]


class _Lazy(dict):
    """A batch that counts its use (to die at the right moment)."""

    def __init__(self, data: Data, i: int) -> None:
        ids = data.pool[i]
        labels = ids.clone()
        labels[:, :3] = -100
        super().__init__(input_ids=ids, labels=labels)
        self.data = data

    def items(self):  # called once when the trainer moves the batch to the device
        self.data.served += 1
        if self.data.kill_at is not None and self.data.served == self.data.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.data.interrupt_at is not None and self.data.served == self.data.interrupt_at:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: KeyboardInterrupt mid-step
        return super().items()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("--kill-at-batch", type=int)
    parser.add_argument("--interrupt-at-batch", type=int)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--optim", default="adamw")
    args = parser.parse_args()
    # A child of a background job (`cmd &` without job control) starts with SIGINT ignored,
    # and Python then installs no KeyboardInterrupt handler: restore it, as a terminal has it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    torch.set_num_threads(1)
    model = tiny_llama(vocab=VOCAB, seed=0)
    add_lora(model, LoraConfig(r=4, alpha=8, dropout=0.1))
    model.lm_head.weight.requires_grad_(True)  # 6144 elements: 8-bit optimizers quantize it
    config = TrainConfig(
        output_dir=args.output_dir,
        batch_size=2,
        grad_accum=2,
        max_steps=10,
        lr=1e-2,
        schedule="cosine",
        warmup_steps=2,
        save_every=3,
        seed=7,
        optim=args.optim,
        optim_page_mb=1,  # several pages even for this tiny model
    )
    try:
        train(
            model,
            config,
            Data(args.kill_at_batch, args.interrupt_at_batch),
            resume=args.resume,
            progress=False,
        )
    except TrainingError as err:  # what `qlora train` prints
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
