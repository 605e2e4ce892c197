"""A whole fine-tuning run from a `RunConfig`: what ``qlora train CONFIG`` does.

load_model (quantize-on-load) -> add_lora -> load_data -> train -> save_adapter, with the
resolved config written beside the outputs so a run can be reproduced or resumed.

Under torchrun every rank runs this; rank 0 claims the output directory, prints and writes
the files, and every rank trains on its slice of each global batch (`qlora.train.parallel`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from torch import nn

from qlora.config import RunConfig, check_data_files
from qlora.devices import resolve_device
from qlora.files import atomic_write
from qlora.nn import add_lora, init_loftq, trainable_report
from qlora.nn.pissa import PissaSplit
from qlora.train.fsdp import ShardWhileLoading, gathered_trainable
from qlora.train.parallel import Distributed, check_offload, distributed_session, rank_slice
from qlora.train.run_dir import OutputDirError, RunDirectory, claim_output_dir

if TYPE_CHECKING:
    from qlora.models.loader import BlockSink, WeightSplit

__all__ = ["EpochBatches", "RunResult", "load_base", "run_training"]


class _LazyBatches(Sequence):
    """One epoch's batches (this rank's slice of each), collated when the trainer gets there."""

    def __init__(self, owner: EpochBatches, epoch: int) -> None:
        self.owner, self.plan = owner, owner.loader.batches(epoch)

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:  # type: ignore[override]
        from qlora.data import IGNORE_INDEX, collate

        loader, place = self.owner.loader, self.owner.place
        indices = self.plan[i]
        if place.active:
            indices = rank_slice(indices, place, self.owner.per_rank)
        blank = not indices  # past the end of a short last batch: one row that adds nothing
        examples = [loader.examples[j] for j in (indices or self.plan[i][:1])]
        batch = collate(examples, loader.pad_id, **loader.collate_kwargs)
        if blank:
            batch["labels"].fill_(IGNORE_INDEX)
        return batch


@dataclass
class EpochBatches:
    """Adapts a `qlora.data.BatchLoader` to the trainer's ``epoch(e) -> batches``.

    Under torchrun the loader's batches are the global ones (``per_rank`` × world size
    examples) and each rank sees its slice of every one (`qlora.train.parallel.rank_slice`).
    """

    loader: Any
    place: Distributed = field(default_factory=Distributed)
    per_rank: int = 0

    def epoch(self, epoch: int) -> Sequence[dict[str, torch.Tensor]]:
        return _LazyBatches(self, epoch)


@dataclass
class RunResult:
    model: nn.Module
    tokenizer: Any
    train: Any  # qlora.train.TrainResult
    adapter_dir: Path
    data_summary: str
    rank: int = 0  # under torchrun: this process's rank (0 prints the summary)


def load_base(
    config: RunConfig,
    progress: bool = True,
    blocks: BlockSink | None = None,
    split: WeightSplit | None = None,
) -> tuple[nn.Module, Any]:
    """The base model and tokenizer as ``config.model`` and ``config.quant`` describe
    (``blocks``: takes each decoder layer as it loads; ``split``: rewrites weights as they
    stream in; see `qlora.models.load_model`)."""
    from qlora.models import load_model

    return load_model(config.model, config.quant, progress=progress, blocks=blocks, split=split)


def _model_dtype(config: RunConfig) -> str:
    """The dtype ``model.dtype`` resolves to (auto: float32 on the CPU, bfloat16 on CUDA)."""
    if config.model.dtype != "auto":
        return config.model.dtype
    return "float32" if resolve_device(config.model.device).type == "cpu" else "bfloat16"


def run_training(
    config: RunConfig,
    resume: bool = False,
    progress: bool = True,
    overwrite: bool = False,
    run_dir: RunDirectory | None = None,
) -> RunResult:
    """Fine-tune as ``config`` says; the adapter goes to ``<output_dir>/adapter`` (PEFT format).

    The output directory is claimed first (new, empty or an earlier run's; locked for the
    run; see `qlora.train.run_dir`): ``resume`` continues the run it holds, ``overwrite``
    starts over in it. A caller that claimed it already (to write inputs there first, as
    the demo does) passes ``run_dir``.
    """
    check_data_files(config.data)  # a typo in a path costs no loading time
    with distributed_session(config.train.parallel, resolve_device(config.model.device)) as place:
        if place.device.type == "cuda":  # each rank on its own GPU
            model = dataclasses.replace(config.model, device=str(place.device))
            config = dataclasses.replace(config, model=model)
        if run_dir is not None or not place.is_main:
            _agree_on_claim(place, None)
            return _run_in(config, run_dir, place, resume=resume, progress=progress)
        try:
            claim = claim_output_dir(config.train.output_dir, resume=resume, overwrite=overwrite)
        except OutputDirError as err:
            _agree_on_claim(place, err)
            raise
        _agree_on_claim(place, None)
        with claim as claimed:
            return _run_in(config, claimed, place, resume=resume, progress=progress)


def _agree_on_claim(place: Distributed, failure: Exception | None) -> None:
    """Rank 0 says whether it claimed the output directory; the others stop if it did not."""
    message = place.broadcast(None if failure is None else str(failure))
    if failure is None and message is not None:
        raise OutputDirError(f"rank 0 could not claim the output directory: {message}")


def _run_in(
    config: RunConfig,
    run_dir: RunDirectory | None,
    place: Distributed,
    *,
    resume: bool,
    progress: bool,
) -> RunResult:
    from qlora.adapters import save_adapter
    from qlora.data import BatchLoader, load_data, pad_id_of
    from qlora.train import train

    main = place.is_main
    say = print if main else (lambda *_: None)
    progress = progress and main
    if run_dir is not None:
        dump = yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)
        atomic_write(run_dir.path / "config.yaml", dump)
    # LoftQ fits the full-precision weights, then quantizes; PiSSA splits each weight as it
    # streams in and the loader quantizes the residual (QPiSSA)
    loftq, pissa = config.lora.init == "loftq", config.lora.init == "pissa"
    full_precision = dataclasses.replace(  # the weights as stored: no bf16 CastLinear
        config,
        quant=dataclasses.replace(config.quant, kind=None, compute_dtype=_model_dtype(config)),
    )
    # FSDP: each layer gets its adapters and is sharded as it loads (no rank holds the base)
    sink, offload = None, config.train.cpu_offload
    check_offload(offload, place)  # before any loading time is spent
    if place.mode == "fsdp" and not (loftq or pissa) and not config.lora.use_dora:
        seed = config.train.seed
        sink = ShardWhileLoading(config.lora, seed, place.world_size, place.device, offload)
    split = PissaSplit(config.lora, config.train.seed) if pissa else None
    model, tokenizer = load_base(full_precision if loftq else config, progress, sink, split)
    pissa_initial = None
    if sink is not None:  # the adapters were drawn before loading, seeded as below
        sink.finish(model)
        say(f"loaded into shards: at most {sink.peak_bytes / 2**20:.1f} MiB of the model per rank")
    elif split is not None:  # the adapters start at the principal parts split off
        report = split.finish(model)
        pissa_initial = report.initial
        say(report)
    else:
        torch.manual_seed(config.train.seed)  # the adapters' initialization is part of the run
        add_lora(model, config.lora)
    if loftq:  # quantize now, fitting the adapters to the quantization error
        say(init_loftq(model, config.lora, config.quant, progress=progress))
    say(trainable_report(model))
    data = load_data(config.data, tokenizer)
    summary = data.summary()
    say(summary)
    pad = pad_id_of(tokenizer)
    per_rank = config.train.batch_size
    loader = BatchLoader(  # the global batches; each rank takes its slice
        data.train,
        per_rank * place.world_size,
        pad,
        seed=config.data.seed,
        group_by_length=config.data.group_by_length,
    )
    eval_batches = None
    if data.eval:
        eval_loader = BatchLoader(data.eval, per_rank, pad, shuffle=False)
        eval_batches = list(eval_loader)
    result = train(
        model,
        config.train,
        EpochBatches(loader, place, per_rank),
        eval_batches,
        resume=resume,
        progress=progress,
        run_dir=run_dir,
        place=place,
    )
    adapter_dir = Path(config.train.output_dir) / "adapter"
    # DDP: the adapters are the same on every rank; FSDP: gathered from the shards first
    with gathered_trainable(model) if place.mode == "fsdp" else contextlib.nullcontext():
        if run_dir is not None and main:
            # PiSSA: adapter/ converted to plain LoRA over the original weights (rank 2r:
            # loads anywhere), adapter-pissa/ as trained (loaders redo the split)
            save_adapter(
                model,
                adapter_dir,
                base_model_name_or_path=config.model.source,
                dtype=config.train.adapter_dtype,
                pissa_initial=pissa_initial,
            )
            if pissa_initial is not None:
                save_adapter(
                    model,
                    adapter_dir.with_name("adapter-pissa"),
                    base_model_name_or_path=config.model.source,
                    dtype=config.train.adapter_dtype,
                )
    place.barrier()  # no rank returns (and tears the group down) before the adapter exists
    return RunResult(model, tokenizer, result, adapter_dir, summary, place.rank)
