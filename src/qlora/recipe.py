"""A whole fine-tuning run from a `RunConfig`: what ``qlora train CONFIG`` does.

load_model (quantize-on-load) -> add_lora -> load_data -> train -> save_adapter, with the
resolved config written beside the outputs so a run can be reproduced or resumed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from qlora.config import RunConfig, check_data_files
from qlora.files import atomic_write
from qlora.nn import add_lora, init_loftq, trainable_report
from qlora.train.run_dir import RunDirectory, claim_output_dir

__all__ = ["EpochBatches", "RunResult", "load_base", "run_training"]


class _LazyBatches(Sequence):
    """One epoch's batches, collated only when the trainer reaches them."""

    def __init__(self, loader: Any, epoch: int) -> None:
        self.loader, self.plan = loader, loader.batches(epoch)

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:  # type: ignore[override]
        from qlora.data import collate

        examples = [self.loader.examples[j] for j in self.plan[i]]
        return collate(examples, self.loader.pad_id, **self.loader.collate_kwargs)


@dataclass
class EpochBatches:
    """Adapts a `qlora.data.BatchLoader` to the trainer's ``epoch(e) -> batches``."""

    loader: Any

    def epoch(self, epoch: int) -> Sequence[dict[str, torch.Tensor]]:
        return _LazyBatches(self.loader, epoch)


@dataclass
class RunResult:
    model: nn.Module
    tokenizer: Any
    train: Any  # qlora.train.TrainResult
    adapter_dir: Path
    data_summary: str


def load_base(config: RunConfig) -> tuple[nn.Module, Any]:
    """The base model and tokenizer as ``config.model`` and ``config.quant`` describe."""
    from qlora.models import load_model

    return load_model(config.model, config.quant)


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
    if run_dir is not None:
        return _run_in(config, run_dir, resume=resume, progress=progress)
    with claim_output_dir(config.train.output_dir, resume=resume, overwrite=overwrite) as claimed:
        return _run_in(config, claimed, resume=resume, progress=progress)


def _run_in(config: RunConfig, run_dir: RunDirectory, *, resume: bool, progress: bool) -> RunResult:
    from qlora.adapters import save_adapter
    from qlora.data import BatchLoader, load_data, pad_id_of
    from qlora.train import train

    out = run_dir.path
    atomic_write(out / "config.yaml", yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
    loftq = config.lora.init == "loftq"  # LoftQ quantizes from the full-precision weights
    full_precision = dataclasses.replace(config, quant=dataclasses.replace(config.quant, kind=None))
    model, tokenizer = load_base(full_precision if loftq else config)
    torch.manual_seed(config.train.seed)  # the adapters' initialization is part of the run
    add_lora(model, config.lora)
    if loftq:  # quantize now, fitting the adapters to the quantization error
        print(init_loftq(model, config.lora, config.quant, progress=progress))
    print(trainable_report(model))
    data = load_data(config.data, tokenizer)
    summary = data.summary()
    print(summary)
    pad = pad_id_of(tokenizer)
    loader = BatchLoader(
        data.train,
        config.train.batch_size,
        pad,
        seed=config.data.seed,
        group_by_length=config.data.group_by_length,
    )
    eval_batches = None
    if data.eval:
        eval_loader = BatchLoader(data.eval, config.train.batch_size, pad, shuffle=False)
        eval_batches = list(eval_loader)
    result = train(
        model,
        config.train,
        EpochBatches(loader),
        eval_batches,
        resume=resume,
        progress=progress,
        run_dir=run_dir,
    )
    adapter_dir = save_adapter(
        model,
        out / "adapter",
        base_model_name_or_path=config.model.source,
        dtype=config.train.adapter_dtype,
    )
    return RunResult(model, tokenizer, result, Path(adapter_dir), summary)
