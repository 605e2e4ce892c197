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

The state saved for step k is the state *between* steps k and k+1, RNG included (taken at
the start of step k+1, before dropout draws from it). So Ctrl-C during the forward or
backward of a step can still save the last completed step exactly; Ctrl-C during the update
itself saves nothing (the parameters are half-updated) and points at the last checkpoint.

The output directory is claimed first (`qlora.train.run_dir`): new, empty or this run's,
locked for the run. Nothing here is global state: everything lives in the call, so several
runs (or ranks) can share a process. Only rank 0 writes files and shows progress.

Under torchrun (`qlora.train.parallel`) every rank runs this same loop on its share of each
global batch; the token count, the logged loss, the token throughput and the evaluation are
all-reduced, so rank 0 logs the global figures. Rank 0 claims the directory and writes the
checkpoints (the adapters and their optimizer state are replicated under DDP; the RNG state
of every rank is stored beside them); every rank resumes from the checkpoint rank 0 picks.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from qlora.config import TrainConfig
from qlora.files import atomic_open, atomic_write
from qlora.optim import build_optimizer
from qlora.procinfo import peak_rss_bytes
from qlora.quant.scratch import release_scratch
from qlora.train.allocator import limit_heap_retention, trim_heap
from qlora.train.checkpoint import (
    CheckpointError,
    checkpoint_dirs,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    save_sharded_checkpoint,
    set_rng_state,
    trainable_state,
)
from qlora.train.fsdp import gathered_bytes, shard_like
from qlora.train.loss import IGNORE_INDEX, causal_lm_loss
from qlora.train.parallel import Distributed, as_float, gradient_sync, wrap_for_training
from qlora.train.run_dir import OutputDirError, RunDirectory, claim_output_dir
from qlora.train.schedule import lr_lambda

__all__ = ["TrainResult", "TrainingError", "evaluate", "train"]

Batch = dict[str, torch.Tensor]
_KEEP = 2  # checkpoints of this run kept on disk (the newest ones)


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


def _blank(batch: Batch) -> Batch:
    """``batch`` with every label ignored: a forward that adds nothing (keeps ranks in step)."""
    return {**batch, "labels": torch.full_like(batch["labels"], IGNORE_INDEX)}


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
def evaluate(
    model: nn.Module,
    batches: Sequence[Batch],
    chunk: int = 1024,
    place: Distributed | None = None,
    loss_model: Any = None,
) -> float:
    """Mean next-token loss per labelled token over ``batches`` (eval mode restored after).

    With ``place`` a world of N ranks, rank r evaluates batches r, r + N, ... and the sums
    are all-reduced: every rank returns the loss over all of ``batches``. ``loss_model``: the
    trainer's wrapped loss computation (needed under FSDP, whose root gathers the weights).
    """
    place = place or Distributed()
    compute = loss_model or (lambda batch, chunk: _forward(model, batch, chunk))
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    mine = list(batches[place.rank :: place.world_size])
    rounds = len(mine)
    if place.mode == "fsdp":  # every rank must run as many forwards (they all-gather)
        rounds = -(-len(batches) // place.world_size)
    for i in range(rounds):
        batch = mine[i] if i < len(mine) else _blank(batches[0])
        loss, n = compute(batch, chunk)
        total, count = total + float(loss.detach()), count + n
    model.train(was_training)
    total, count = place.all_reduce_sum([total, count])
    if count == 0:
        raise TrainingError("the evaluation data has no labelled tokens")
    return total / count


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        return peak_rss_bytes() / 2**20
    except OSError:
        return float("nan")


def _say(message: str) -> None:
    print(f"qlora: {message}", file=sys.stderr, flush=True)


def _enable_checkpointing(model: nn.Module, place: Distributed) -> None:
    # Under DDP it must be non-reentrant (the reentrant form fails with "mark a variable
    # ready only once"); transformers' activation_checkpointing_enable is by default.
    kwargs = {"use_reentrant": False}
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs) if place.active else enable()
        return
    enable = getattr(model, "gradient_checkpointing_enable", None)
    if enable is None:
        raise TrainingError(f"{type(model).__name__} does not support gradient checkpointing")
    enable(gradient_checkpointing_kwargs=kwargs) if place.active else enable()


def _rank_seed(seed: int, rank: int) -> int:
    """Rank r's torch seed: rank 0 keeps the run's seed (world 1 is unchanged)."""
    return seed if rank == 0 else (seed * 1_000_003 + rank) % 2**63


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
    with atomic_open(path, "wb") as f:
        fig.savefig(f, dpi=120, format="png")
    plt.close(fig)


@dataclass
class _Cursor:
    """Where the run stands between two optimizer steps."""

    step: int = 0
    epoch: int = 0
    index: int = 0


class _Run:
    """One call of `train`: its optimizer, schedule, cursor and files, in named stages."""

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        train_data: EpochBatches | Sequence[Batch],
        eval_data: Sequence[Batch] | None,
        run_dir: RunDirectory | None,
        progress: bool,
        place: Distributed,
    ) -> None:
        self.model, self.config, self.train_data = model, config, train_data
        self.eval_data, self.place = eval_data, place
        self.run_dir, self.main = run_dir, run_dir is not None and place.is_main
        self.out = Path(config.output_dir)
        if not any(p.requires_grad for p in model.parameters()):
            raise TrainingError("the model has no trainable parameters: call qlora.add_lora first")
        if place.mode == "fsdp" and config.optim != "adamw":
            raise TrainingError(
                f"train.parallel=fsdp works with train.optim=adamw (torch's AdamW on sharded "
                f"parameters); {config.optim} keeps its own state layout: use adamw, or ddp"
            )
        # FSDP checkpoints are written by every rank when rank 0 has a run directory
        self.shards_saved = place.mode == "fsdp" and bool(place.broadcast(self.main))
        self.loss_model = wrap_for_training(model, _forward, place, config.cpu_offload)
        # after wrapping: FSDP2 replaces the parameters with sharded ones
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.device = place.device if config.cpu_offload else self.params[0].device
        per_epoch = len(_batches(train_data, 0))
        if per_epoch == 0:
            raise TrainingError("the training data has no batches")
        self.total_steps = config.max_steps or max(
            1, int(config.epochs * per_epoch) // config.grad_accum
        )
        self.optimizer = build_optimizer(
            config.optim,
            self.params,
            lr=config.lr,
            weight_decay=config.weight_decay,
            page_bytes=config.optim_page_mb << 20,
            state_dir=self._optimizer_dir(),
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(config.schedule, config.warmup_steps, self.total_steps)
        )
        self.cursor = _Cursor()
        self.history: list[dict[str, float]] = []
        self.progress = progress
        self.saved_step = 0  # the newest step with a checkpoint on disk
        self.gathered = (0, 0)  # bytes all-gathered so far, and with a bf16 base (FSDP)
        self.boundary_rng: dict[str, Any] = {}

    def _optimizer_dir(self) -> Path:
        """Where a paged optimizer keeps its state file on the CPU: one folder per rank."""
        chosen = self.config.optim_dir
        base = Path(chosen) if chosen else self.out / "optimizer-state"
        return base / f"rank-{self.place.rank}" if self.place.active else base

    # -- resuming ---------------------------------------------------------------------------

    def _newest_readable(self) -> tuple[Path | None, str | None, dict[str, Any] | None]:
        """Rank 0's pick: (path, None, state), (None, error, None) or (None, None, None)."""
        problems = []
        for _, path in reversed(checkpoint_dirs(self.out)):
            try:
                run_id, state = load_checkpoint(path)
            except CheckpointError as err:
                problems.append(str(err))
                _say(f"skipping {path.name}: {err}")
                continue
            if self.run_dir is not None and run_id != self.run_dir.run_id:
                _say(f"skipping {path.name}: written by another run than this directory's")
                continue
            return path, None, state
        if problems:
            return (
                None,
                (
                    f"--resume: no readable checkpoint in {self.out} ({len(problems)} unreadable; "
                    f"the newest: {problems[0]}); start a new run in another train.output_dir"
                ),
                None,
            )
        return None, None, None

    def restore_newest(self) -> None:
        """Load the newest readable checkpoint (rank 0 picks it); skip unreadable ones."""
        path, error, state = self._newest_readable() if self.place.is_main else (None, None, None)
        path, error = self.place.broadcast((path, error))
        if error is not None:
            raise TrainingError(error)
        if path is None:
            if self.main:
                _say(f"--resume: no checkpoint in {self.out} yet; starting from step 0")
            return
        if state is None:  # another rank: read what rank 0 picked
            try:
                _, state = load_checkpoint(path)
            except CheckpointError as err:
                raise TrainingError(f"rank {self.place.rank}: {err}") from None
        self.restore(state, path)
        if self.main:
            _say(f"resuming from {path.name} (step {state['step']} of {self.total_steps})")

    def _restore_rng(self, state: dict[str, Any]) -> None:
        """This rank's RNG as saved; at another world size rank 0's, the others seeded anew."""
        place, saved_world = self.place, int(state.get("world_size", 1))
        same_world, per_rank = saved_world == place.world_size, state.get("rng_ranks")
        if same_world and per_rank is not None:
            set_rng_state(per_rank[place.rank])
        elif same_world or place.rank == 0:
            set_rng_state(state["rng"])
        else:
            random.seed(self.config.seed + state["step"])
            torch.manual_seed(_rank_seed(self.config.seed + state["step"], place.rank))
        if not same_world and self.main:
            _say(
                f"the checkpoint was written by {saved_world} rank(s), this run has "
                f"{place.world_size}: the data order and the adapters continue exactly; "
                "random draws (dropout) on ranks other than 0 start from fresh seeds"
            )

    def restore(self, state: dict[str, Any], path: Path) -> None:
        self._check_fits(state, path)
        self._check_global_batch(state, path)
        named = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in state["trainable"].items():
                named[name].copy_(shard_like(value, named[name]))
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            for param in self.params:  # FSDP: the moments as shards of their parameter
                moments = self.optimizer.state.get(param, {})
                for key, value in moments.items():
                    if isinstance(value, torch.Tensor):
                        moments[key] = shard_like(value, param)
            self.scheduler.load_state_dict(state["scheduler"])
            self._restore_rng(state)
        except (KeyError, ValueError, TypeError, RuntimeError) as err:
            raise TrainingError(
                f"{path}: the checkpoint's optimizer state does not load: {err}"
            ) from None
        self.cursor = _Cursor(state["step"], state["epoch"], state["index"])
        self.saved_step = state["step"]
        self.history = [h for h in state["history"] if h["step"] <= state["step"]]

    def _check_global_batch(self, state: dict[str, Any], path: Path) -> None:
        """The data cursor counts global batches: their size must not change on resume."""
        saved_world = int(state.get("world_size", 1))
        saved = state.get("global_batch")
        ours = self.config.batch_size * self.place.world_size
        if saved is None or saved == ours:
            return
        world = self.place.world_size
        written = f"{path} was written with a global batch of {saved} examples"
        if saved % world:
            raise TrainingError(
                f"{written}, which {world} ranks cannot share evenly: resume with a world "
                f"size that divides {saved}"
            )
        raise TrainingError(
            f"{written} ({saved_world} rank(s)); this run's is {ours} ({world} x "
            f"train.batch_size {self.config.batch_size}): set train.batch_size="
            f"{saved // world} so that the global batch stays the same"
        )

    def _check_fits(self, state: dict[str, Any], path: Path) -> None:
        """The checkpoint must be of this model's adapters and this optimizer."""
        saved = state.get("config", {}).get("optim")
        if saved is not None and saved != self.config.optim:
            raise TrainingError(
                f"{path} was written with train.optim={saved}, this run has "
                f"train.optim={self.config.optim}: resume with the optimizer the run started "
                "with, or start a new run in another train.output_dir"
            )
        ours = {n: tuple(p.shape) for n, p in self.model.named_parameters() if p.requires_grad}
        theirs = {n: tuple(t.shape) for n, t in state["trainable"].items()}
        missing, extra = sorted(set(theirs) - set(ours)), sorted(set(ours) - set(theirs))
        if missing or extra:
            name = (missing or extra)[0]
            where = "the checkpoint has" if missing else "this model has"
            raise TrainingError(
                f"{path} does not fit this model: {where} trainable {name} and the other does "
                f"not ({len(missing)} + {len(extra)} differ); lora.target_modules (or the base "
                "model) changed since the checkpoint: resume with the run's config.yaml"
            )
        for name, shape in theirs.items():
            if ours[name] != shape:
                raise TrainingError(
                    f"{path} does not fit this model: {name} is {list(shape)} in the checkpoint, "
                    f"{list(ours[name])} here; lora.r (or the base model) changed since the "
                    "checkpoint: resume with the run's config.yaml"
                )

    # -- one optimizer step -------------------------------------------------------------------

    def compute(self, stream: Iterator[tuple]) -> tuple[list[tuple], float, int, int]:
        """Forward and backward of one step's micro-batches: (micro, loss sum, count, tokens).

        The sums are over every rank's micro-batches. Each rank divides its summed loss by
        the global token count (and multiplies by the world size, which DDP's mean undoes);
        DDP reduces the gradients on the last micro-batch only.
        """
        place, world = self.place, self.place.world_size
        micro = [next(stream) for _ in range(self.config.grad_accum)]
        (count,) = place.all_reduce_sum([sum(_labelled(b) for _, _, b in micro)])
        count = int(count)
        step_loss, tokens = 0.0, 0
        for i, (_, _, batch) in enumerate(micro):
            with gradient_sync(self.loss_model, enabled=i == len(micro) - 1):
                loss, _ = self.loss_model(batch, self.config.loss_chunk)
                scaled = loss / max(count, 1)
                (scaled * world if world > 1 else scaled).backward()
            step_loss += float(loss.detach())
            tokens += int(batch["input_ids"].numel())
        step_loss, tokens = place.all_reduce_sum([step_loss, tokens])
        if not math.isfinite(step_loss):  # every rank sees the sum, so every rank stops
            newest = checkpoint_dirs(self.out)
            raise TrainingError(
                f"step {self.cursor.step + 1}: the loss is {step_loss / max(count, 1)}; stopped "
                f"before the update. Last good checkpoint: "
                f"{newest[-1][1] if newest else 'none'}. Lower train.lr, check the data, "
                "or use float32 compute"
            )
        return micro, step_loss, count, int(tokens)

    def update(self, micro: list[tuple]) -> float:
        """Clip, step the optimizer and the schedule; advance the cursor. Returns the norm."""
        config = self.config
        grad_norm = (
            as_float(torch.nn.utils.clip_grad_norm_(self.params, config.max_grad_norm))
            if config.max_grad_norm > 0
            else float("nan")
        )
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cpu" and config.malloc_mmap_kb > 0 and config.grad_ckpt:
            # checkpointing asks for memory: hand the heap's free pages back between steps
            # (without it the step's own activations dominate the peak, and refaulting
            # them costs ~10% of a step: qlora.train.allocator)
            trim_heap()
        self.cursor = _Cursor(self.cursor.step + 1, micro[-1][0], micro[-1][1] + 1)
        return grad_norm

    # -- files --------------------------------------------------------------------------------

    def save(self) -> None:
        """Checkpoint the state between the last step and the next (see the module docstring).

        Every rank calls it (the RNG states are gathered). Rank 0 writes the checkpoint;
        under FSDP every rank writes its shards of the adapters and optimizer state into it.
        """
        if self.saved_step == self.cursor.step:
            return
        rngs = self.place.gather(self.boundary_rng) if self.place.active else None
        fsdp = self.place.mode == "fsdp"
        if not (self.main or (fsdp and self.shards_saved)):
            self.saved_step = self.cursor.step
            return
        # FSDP: the sharded tensors (DTensors), each rank writing its pieces; else copies
        trainable = trainable_state(self.model, copy=not fsdp)
        state = {
            "trainable": trainable,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": self.boundary_rng,
            "step": self.cursor.step,
            "epoch": self.cursor.epoch,
            "index": self.cursor.index,
            "history": self.history,
            "config": asdict(self.config),
            "world_size": self.place.world_size,
            "global_batch": self.config.batch_size * self.place.world_size,
        }
        if rngs is not None:
            state["rng_ranks"] = rngs
        run_id = self.run_dir.run_id if self.run_dir is not None else ""
        try:
            if fsdp:
                save_sharded_checkpoint(self.out, self.cursor.step, state, run_id, self.place)
            else:
                save_checkpoint(self.out, self.cursor.step, state, run_id)
        except CheckpointError as err:
            raise TrainingError(f"step {self.cursor.step}: cannot checkpoint: {err}") from None
        self.saved_step = self.cursor.step
        if self.run_dir is not None and self.main:
            self.run_dir.prune(_KEEP)
        if hasattr(self.optimizer, "release_pages"):  # saving read the paged state in
            self.optimizer.release_pages()

    def log(self, record: dict[str, float], board: Any = None) -> None:
        self.history.append(record)
        if self.main:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        if board is not None:
            for key, value in record.items():
                if key != "step":
                    board.add_scalar(key, value, record["step"])

    # -- the loop -----------------------------------------------------------------------------

    def run(self, resume: bool) -> TrainResult:
        config = self.config
        if resume:
            self.restore_newest()
        else:
            random.seed(config.seed)
            torch.manual_seed(_rank_seed(config.seed, self.place.rank))
        if self.main:  # metrics.jsonl holds exactly the history up to the resumed step
            atomic_write(
                self.out / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in self.history)
            )
        if config.grad_ckpt:
            _enable_checkpointing(self.model, self.place)
        if self.device.type == "cpu" and config.malloc_mmap_kb > 0:
            limit_heap_retention(config.malloc_mmap_kb)
        self.model.train()
        board = _tensorboard(self.out) if config.tensorboard and self.main else None
        bar = tqdm(total=self.total_steps, initial=self.cursor.step, desc="train", unit="step",
                   disable=not (self.progress and self.main))  # fmt: skip
        try:
            result = self._loop(bar, board)
        finally:
            bar.close()
            if board is not None:
                board.close()
            release_scratch()  # the loss's logits buffers and the held bf16 input copy
        return result

    def _loop(self, bar: Any, board: Any) -> TrainResult:
        config = self.config
        stream = _stream(self.train_data, self.cursor.epoch, self.cursor.index)
        start, tokens_seen, last_loss = time.perf_counter(), 0, float("nan")
        eval_loss = None
        while self.cursor.step < self.total_steps:
            self.boundary_rng = rng_state()
            phase = "compute"
            try:
                micro, step_loss, count, tokens = self.compute(stream)
                phase = "update"
                grad_norm = self.update(micro)
                phase = "after"
                tokens_seen += tokens
                last_loss = step_loss / max(count, 1)
                elapsed = time.perf_counter() - start
                record = {
                    "step": self.cursor.step,
                    "loss": last_loss,
                    "lr": self.scheduler.get_last_lr()[0],
                    "grad_norm": grad_norm,
                    "tokens_per_s": tokens_seen / elapsed,
                    "memory_mb": _memory_mb(self.device),
                    "elapsed_s": elapsed,
                }
                if self.place.active:  # the fullest rank's peak: what each machine must hold
                    (record["memory_mb_max_rank"],) = self.place.all_reduce_max(
                        [record["memory_mb"]]
                    )
                if self.place.mode == "fsdp":  # what this rank all-gathered in the step
                    moved, bf16 = gathered_bytes(self.loss_model)
                    record["allgather_mb"] = (moved - self.gathered[0]) / 2**20
                    record["allgather_vs_bf16"] = (moved - self.gathered[0]) / max(
                        bf16 - self.gathered[1], 1
                    )
                    self.gathered = (moved, bf16)
                step = self.cursor.step
                if self.eval_data and config.eval_every and step % config.eval_every == 0:
                    eval_loss = self.evaluate()
                    if self.place.mode == "fsdp":  # not the step's traffic
                        self.gathered = gathered_bytes(self.loss_model)
                    record["eval_loss"] = eval_loss
                self.log(record, board)
                bar.set_postfix(loss=f"{last_loss:.4f}", tok_s=f"{record['tokens_per_s']:.0f}",
                                mem=f"{record['memory_mb']:.0f}MB", refresh=False)  # fmt: skip
                bar.update()
                if config.save_every and step % config.save_every == 0 and step < self.total_steps:
                    self.boundary_rng = rng_state()
                    self.save()
            except KeyboardInterrupt:
                self.interrupted(phase)
        return self.finish(eval_loss, last_loss, time.perf_counter() - start, tokens_seen)

    def evaluate(self) -> float:
        assert self.eval_data is not None
        return evaluate(
            self.model, self.eval_data, self.config.loss_chunk, self.place, self.loss_model
        )

    def interrupted(self, phase: str) -> None:
        """Ctrl-C: save the last completed step if the state is whole, then say how to resume.

        In "compute" the parameters are still those of the last completed step (the RNG
        state of that boundary was taken before the forward); in "after" the step is
        complete and the RNG has not been drawn from since; in "update" they are half
        updated, so nothing is saved.
        """
        with contextlib.suppress(KeyboardInterrupt):  # ranks may be mid-collective: no save
            if phase != "update" and self.cursor.step > 0 and not self.place.active:
                if phase == "after":
                    self.boundary_rng = rng_state()
                self.optimizer.zero_grad(set_to_none=True)
                self.save()
        newest = checkpoint_dirs(self.out)
        where = (
            f"{newest[-1][1]} (step {newest[-1][0]}) is the newest checkpoint: run the same "
            "command with --resume to continue from it"
            if newest
            else "no checkpoint was written: the next run starts from step 0"
        )
        when = (
            f"after step {self.cursor.step}"
            if phase == "after"
            else f"during step {self.cursor.step + 1}"
        )
        raise TrainingError(f"interrupted {when}; {where}") from None

    def finish(
        self, eval_loss: float | None, last_loss: float, seconds: float, tokens: int
    ) -> TrainResult:
        config, step = self.config, self.cursor.step
        if self.eval_data and (
            eval_loss is None or not config.eval_every or step % config.eval_every
        ):
            eval_loss = self.evaluate()
            self.log({"step": step, "eval_loss": eval_loss})
        if self.main and self.history:
            _write_plot(self.history, self.out / "loss.png")
        if not math.isfinite(last_loss) and self.history:
            last_loss = next((h["loss"] for h in reversed(self.history) if "loss" in h), last_loss)
        return TrainResult(step, last_loss, eval_loss, seconds, tokens, self.out, self.history)


def train(
    model: nn.Module,
    config: TrainConfig,
    train_data: EpochBatches | Sequence[Batch],
    eval_data: Sequence[Batch] | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    run_dir: RunDirectory | None = None,
    place: Distributed | None = None,
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
        resume: continue from the newest readable checkpoint in ``config.output_dir``.
        overwrite: start over in a directory that holds an earlier run's outputs (its
            checkpoints are deleted; nothing that is not a qlora run's is ever touched).
        run_dir: the output directory, already claimed by the caller (`claim_output_dir`);
            by default `train` claims ``config.output_dir`` itself for the call. Under
            torchrun only rank 0 holds it; the other ranks pass None.
        place: this process's rank and world (`qlora.train.parallel.distributed_session`);
            None: a single process. Every rank calls `train` with its own share of the data
            (``train_data`` holds this rank's slice of each global batch).

    Returns:
        A `TrainResult`; ``output_dir`` also holds metrics.jsonl, loss.png and checkpoints.

    Raises:
        TrainingError: no trainable parameters, empty data, a NaN/inf loss (training stops
            before the bad update; the last good checkpoint is kept), a checkpoint that does
            not fit, or Ctrl-C (the message says how to resume).
        OutputDirError: the output directory is not this run's to write (see `run_dir`).
    """
    place = place or Distributed()
    owned, failure = None, None
    if run_dir is None and place.is_main:
        try:
            owned = run_dir = claim_output_dir(
                config.output_dir, resume=resume, overwrite=overwrite
            )
        except OutputDirError as err:
            failure = err
    message = place.broadcast(None if failure is None else str(failure))
    if failure is not None:
        raise failure
    if message is not None:  # the other ranks stop with rank 0's reason
        raise TrainingError(f"rank 0 could not claim the output directory: {message}")
    try:
        return _Run(model, config, train_data, eval_data, run_dir, progress, place).run(resume)
    finally:
        if owned is not None:
            owned.release()
