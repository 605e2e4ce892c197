"""The training loop: accumulation, clipping, schedules, evaluation, checkpoints, metrics.

One optimizer step takes ``grad_accum`` micro-batches. The loss of a step is the mean over
every labelled token of all its micro-batches (not a mean of per-batch means, which would
weight short batches more): the labelled tokens are counted first, then each micro-batch's
summed loss is divided by that count before its backward.

Data comes as an object with ``epoch(e) -> Sequence[batch]`` (or a plain sequence, the same
every epoch): the batches of an epoch are a deterministic function of the epoch number, so
the cursor is just (epoch, index) and a resumed run sees exactly the batches the killed
one would have seen. With the RNG states, optimizer and scheduler restored too, the losses
after ``resume=True`` equal those of an uninterrupted run.

Nothing here is global state: everything lives in the call, so several runs (or ranks)
can share a process. Only rank 0 writes files and shows progress.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from qlora.config import TrainConfig
from qlora.optim import build_optimizer
from qlora.train.allocator import limit_heap_retention
from qlora.train.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    trainable_state,
)
from qlora.train.loss import IGNORE_INDEX, causal_lm_loss
from qlora.train.schedule import lr_lambda

__all__ = ["TrainResult", "TrainingError", "evaluate", "train"]

Batch = dict[str, torch.Tensor]


class TrainingError(RuntimeError):
    """Training cannot go on (NaN loss, nothing to train, ...); the message says why."""


class EpochBatches(Protocol):
    def epoch(self, epoch: int) -> Sequence[Batch]: ...


@dataclass
class TrainResult:
    steps: int
    train_loss: float
    eval_loss: float | None
    seconds: float
    tokens: int
    output_dir: Path
    history: list[dict[str, float]] = field(default_factory=list)


def _batches(data: EpochBatches | Sequence[Batch], epoch: int) -> Sequence[Batch]:
    return data.epoch(epoch) if hasattr(data, "epoch") else data  # type: ignore[union-attr]


def _stream(data: EpochBatches | Sequence[Batch], epoch: int, index: int) -> Iterator[tuple]:
    """(epoch, index, batch) from the cursor on, forever (epochs repeat)."""
    while True:
        batches = _batches(data, epoch)
        if not batches:
            raise TrainingError("the training data has no batches")
        for i in range(index, len(batches)):
            yield epoch, i, batches[i]
        epoch, index = epoch + 1, 0


def _labelled(batch: Batch) -> int:
    return int((batch["labels"][..., 1:] != IGNORE_INDEX).sum())


def _forward(model: nn.Module, batch: Batch, chunk: int) -> tuple[torch.Tensor, int]:
    device = next(model.parameters()).device
    moved = {k: v.to(device) for k, v in batch.items()}
    return causal_lm_loss(
        model,
        moved["input_ids"],
        moved["labels"],
        attention_mask=moved.get("attention_mask"),
        position_ids=moved.get("position_ids"),
        chunk=chunk,
    )


@torch.no_grad()
def evaluate(model: nn.Module, batches: Sequence[Batch], chunk: int = 1024) -> float:
    """Mean next-token loss per labelled token over ``batches`` (eval mode restored after)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        loss, n = _forward(model, batch, chunk)
        total, count = total + float(loss.detach()), count + n
    model.train(was_training)
    if count == 0:
        raise TrainingError("the evaluation data has no labelled tokens")
    return total / count


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _is_main() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
        torch.distributed.get_rank() == 0
    )


def _enable_checkpointing(model: nn.Module) -> None:
    enable = getattr(model, "activation_checkpointing_enable", None) or getattr(
        model, "gradient_checkpointing_enable", None
    )
    if enable is None:
        raise TrainingError(f"{type(model).__name__} does not support gradient checkpointing")
    enable()


def _tensorboard(out: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise TrainingError(
            "train.tensorboard=true needs the tensorboard package: pip install tensorboard"
        ) from None
    return SummaryWriter(log_dir=str(out / "tensorboard"))


def _write_plot(history: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", lw=1)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def train(
    model: nn.Module,
    config: TrainConfig,
    train_data: EpochBatches | Sequence[Batch],
    eval_data: Sequence[Batch] | None = None,
    *,
    resume: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Train ``model``'s trainable parameters (its adapters) on ``train_data``.

    Args:
        model: a causal LM whose parameters to train have ``requires_grad`` (e.g. after
            `qlora.add_lora`).
        config: the loop's settings.
        train_data: batches (``input_ids``, ``labels`` with -100 where no loss is taken,
            optional ``attention_mask`` and ``position_ids``) as ``epoch(e) -> batches`` or a
            sequence used for every epoch.
        eval_data: batches for ``eval_every`` and the final evaluation.
        resume: continue from the newest checkpoint in ``config.output_dir``.

    Returns:
        A `TrainResult`; ``output_dir`` also holds metrics.jsonl, loss.png and checkpoints.

    Raises:
        TrainingError: no trainable parameters, empty data, or a NaN/inf loss (training stops
            before the bad update; the last good checkpoint is kept).
    """
    out = Path(config.output_dir)
    main = _is_main()
    if main:
        out.mkdir(parents=True, exist_ok=True)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainingError("the model has no trainable parameters: call qlora.add_lora first")
    device = params[0].device
    per_epoch = len(_batches(train_data, 0))
    if per_epoch == 0:
        raise TrainingError("the training data has no batches")
    total_steps = config.max_steps or max(1, int(config.epochs * per_epoch) // config.grad_accum)

    optimizer = build_optimizer(
        config.optim,
        params,
        lr=config.lr,
        weight_decay=config.weight_decay,
        page_bytes=config.optim_page_mb << 20,
        state_dir=config.optim_dir or out / "optimizer-state",
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(config.schedule, config.warmup_steps, total_steps)
    )
    step, epoch, index = 0, 0, 0
    history: list[dict[str, float]] = []
    metrics_path = out / "metrics.jsonl"
    if resume and (found := latest_checkpoint(out)) is not None:
        state = load_checkpoint(found)
        named = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in state["trainable"].items():
                named[name].copy_(value)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        step, epoch, index = state["step"], state["epoch"], state["index"]
        history = [h for h in state["history"] if h["step"] <= step]
    else:
        random.seed(config.seed)
        torch.manual_seed(config.seed)
    if main:  # metrics.jsonl holds exactly the history up to the resumed step
        tmp = metrics_path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(h) + "\n" for h in history))
        os.replace(tmp, metrics_path)
    if config.grad_ckpt:
        _enable_checkpointing(model)
    if device.type == "cpu" and config.malloc_mmap_kb > 0:
        limit_heap_retention(config.malloc_mmap_kb)
    model.train()

    board = _tensorboard(out) if config.tensorboard and main else None
    stream = _stream(train_data, epoch, index)
    bar = tqdm(
        total=total_steps, initial=step, desc="train", unit="step", disable=not (progress and main)
    )
    start, tokens_seen, last_loss = time.perf_counter(), 0, float("nan")
    eval_loss = None
    while step < total_steps:
        micro = [next(stream) for _ in range(config.grad_accum)]
        count = sum(_labelled(b) for _, _, b in micro)
        step_loss = 0.0
        for _, _, batch in micro:
            loss, _ = _forward(model, batch, config.loss_chunk)
            if not torch.isfinite(loss):
                saved = latest_checkpoint(out)
                raise TrainingError(
                    f"step {step + 1}: the loss is {float(loss.detach())}; stopped before the "
                    f"update. Last good checkpoint: {saved or 'none'}. Lower train.lr, check "
                    "the data, or use float32 compute"
                )
            (loss / max(count, 1)).backward()
            step_loss += float(loss.detach())
            tokens_seen += int(batch["input_ids"].numel())
        grad_norm = (
            float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm))
            if config.max_grad_norm > 0
            else float("nan")
        )
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        epoch, index = micro[-1][0], micro[-1][1] + 1
        last_loss = step_loss / max(count, 1)
        elapsed = time.perf_counter() - start
        record = {
            "step": step,
            "loss": last_loss,
            "lr": scheduler.get_last_lr()[0],
            "grad_norm": grad_norm,
            "tokens_per_s": tokens_seen / elapsed,
            "memory_mb": _memory_mb(device),
            "elapsed_s": elapsed,
        }
        if eval_data and config.eval_every and step % config.eval_every == 0:
            eval_loss = evaluate(model, eval_data, config.loss_chunk)
            record["eval_loss"] = eval_loss
        history.append(record)
        if board is not None:
            for key, value in record.items():
                if key != "step":
                    board.add_scalar(key, value, step)
        if main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            bar.set_postfix(
                loss=f"{last_loss:.4f}",
                tok_s=f"{record['tokens_per_s']:.0f}",
                mem=f"{record['memory_mb']:.0f}MB",
                refresh=False,
            )
            bar.update()
            if config.save_every and step % config.save_every == 0 and step < total_steps:
                save_checkpoint(
                    out,
                    step,
                    {
                        "trainable": trainable_state(model),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "rng": rng_state(),
                        "step": step,
                        "epoch": epoch,
                        "index": index,
                        "history": history,
                        "config": asdict(config),
                    },
                )
                if hasattr(optimizer, "release_pages"):  # saving read the paged state in
                    optimizer.release_pages()
    bar.close()
    if board is not None:
        board.close()
    if eval_data and (eval_loss is None or not config.eval_every or step % config.eval_every):
        eval_loss = evaluate(model, eval_data, config.loss_chunk)
        history.append({"step": step, "eval_loss": eval_loss})
        if main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(history[-1]) + "\n")
    if main and history:
        _write_plot(history, out / "loss.png")
    if not math.isfinite(last_loss) and history:
        last_loss = next((h["loss"] for h in reversed(history) if "loss" in h), last_loss)
    return TrainResult(
        steps=step,
        train_loss=last_loss,
        eval_loss=eval_loss,
        seconds=time.perf_counter() - start,
        tokens=tokens_seen,
        output_dir=out,
        history=history,
    )
