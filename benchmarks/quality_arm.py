"""One arm of the quality experiment (`benchmarks/quality.py`), run in its own process.

An arm is a way to fine-tune (full, LoRA on a float32 base, QLoRA over a k-bit base, LoftQ)
applied to one task with one seed. The child loads the default model as the arm says,
measures the held-out loss (and, for the generated task, exact match) before training,
trains with `qlora.train` (held-out loss every ``eval_every`` steps), measures again, and
writes ``result.json`` (atomically) beside the run directory ``train/`` (metrics.jsonl,
loss.png). Its peak resident memory (VmHWM: imports, loading, training and evaluation)
is the arm's memory.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from qlora.files import atomic_write

Method = Literal["full", "lora"]


@dataclass(frozen=True)
class Arm:
    """How the base is stored and what trains.

    Attributes:
        name: the arm's key (CLI, tables, file names).
        label: what the arm is, for the report.
        method: "full" (every parameter trains, no adapter) or "lora".
        quant: the frozen base's codebook, "gguf" for the file's own blocks, None for float32.
        double_quant: quantize the absmax constants too.
        init: the adapters' initialization ("kaiming", "loftq" or "pissa").
        dora: DoRA adapters (a trainable magnitude per output row).
        lr_scale: the arm's learning rate relative to the task's adapter rate (PiSSA's
            adapters start at W's principal part, large values that Adam moves by ~lr per
            step per element: a lower rate is PiSSA's own recommendation).
        compute_dtype: the frozen base's matmul dtype (``quant.compute_dtype``); float32
            unless the arm is about bf16 compute, so that every other arm is unchanged by
            the machine it runs on.
    """

    name: str
    label: str
    method: Method
    quant: str | None = None
    double_quant: bool = True
    init: str = "kaiming"
    dora: bool = False
    lr_scale: float = 1.0
    compute_dtype: str = "float32"


ARMS: dict[str, Arm] = {
    arm.name: arm
    for arm in (
        Arm("full-fp32", "full fine-tuning, float32", "full"),
        Arm("lora-fp32", "LoRA, float32 base", "lora"),
        Arm("qlora-nf4-dq", "QLoRA, NF4 + double quant", "lora", "nf4"),
        Arm(
            "qlora-nf4-dq-bf16",
            "QLoRA, NF4 + double quant, bfloat16 compute",
            "lora",
            "nf4",
            compute_dtype="bfloat16",
        ),
        # bf16 vs float32 compute where the reverse task trains smoothly (on request)
        Arm(
            "qlora-nf4-dq-lr0.3", "QLoRA, NF4 + DQ, 0.3x learning rate", "lora", "nf4", lr_scale=0.3
        ),
        Arm(
            "qlora-nf4-dq-bf16-lr0.3",
            "QLoRA, NF4 + DQ, bfloat16 compute, 0.3x learning rate",
            "lora",
            "nf4",
            lr_scale=0.3,
            compute_dtype="bfloat16",
        ),
        Arm("qlora-fp4", "QLoRA, FP4 + double quant", "lora", "fp4"),
        Arm("qlora-int8", "QLoRA, int8 + double quant", "lora", "int8"),
        Arm("qlora-nf2", "QLoRA, NF2 + double quant", "lora", "nf2"),
        # the default model is a Q4_1 GGUF: train on its own blocks (no second rounding)
        Arm("qlora-gguf", "QLoRA on the GGUF's own blocks (Q4_1)", "lora", "gguf"),
        Arm("loftq-nf4-dq", "LoftQ init, NF4 + double quant", "lora", "nf4", init="loftq"),
        Arm("loftq-fp4", "LoftQ init, FP4 + double quant", "lora", "fp4", init="loftq"),
        Arm("loftq-nf2", "LoftQ init, NF2 + double quant", "lora", "nf2", init="loftq"),
        Arm("dora-fp32", "DoRA, float32 base", "lora", dora=True),
        Arm("qdora-nf4-dq", "QDoRA, NF4 + double quant", "lora", "nf4", dora=True),
        Arm(
            "pissa-nf4-dq", "QPiSSA: PiSSA init, residual in NF4 + DQ", "lora", "nf4", init="pissa"
        ),
        Arm(
            "pissa-nf4-dq-lr0.1",
            "QPiSSA at a tenth of the adapter learning rate",
            "lora",
            "nf4",
            init="pissa",
            lr_scale=0.1,
        ),
    )
}


@dataclass(frozen=True)
class Budget:
    """What every arm of one task gets: the same data, steps, schedule and seeds.

    Attributes:
        steps: optimizer steps.
        batch_size: examples per step.
        lr_lora: peak learning rate of the adapter arms.
        lr_full: peak learning rate of full fine-tuning (updating every weight needs a
            smaller one; 10x below LoRA's is the usual ratio).
        warmup_steps: linear warmup, then constant (QLoRA's schedule).
        eval_every: held-out loss every N steps (and at 0 and the end).
        n_eval: held-out examples.
        max_seq_len: longer examples are truncated.
        n_train: records generated for the training split (generated task only).
        max_new_tokens: greedy generation length for exact match (generated task only).
    """

    steps: int
    batch_size: int
    lr_lora: float
    lr_full: float
    warmup_steps: int
    eval_every: int
    n_eval: int
    max_seq_len: int = 256
    n_train: int = 400
    max_new_tokens: int = 12


LORA = {"r": 16, "alpha": 32.0, "dropout": 0.05}  # QLoRA's small-model adapter recipe
EVAL_SEED = 0  # the held-out split never depends on the run's seed


def _data(task: str, data_path: str, budget: Budget, out: Path, tokenizer: Any) -> tuple:
    """(train examples, eval examples sorted by length, eval records for exact match)."""
    from qlora.config import DataConfig
    from qlora.data import load_data, make_task_dataset, write_jsonl

    if task == "alpaca":
        config = DataConfig(
            path=data_path,
            format="alpaca",
            eval_fraction=0.05,
            seed=EVAL_SEED,
            max_seq_len=budget.max_seq_len,
            # Two records of the subset have an empty output: valid examples (label: EOS) since
            # issue 14; docs/results.md was measured before, when they were skipped.
            on_bad_record="skip",
        )
        data = load_data(config, tokenizer)
        records = None
    else:
        train_records, records = make_task_dataset(budget.n_train, budget.n_eval, seed=EVAL_SEED)
        train_path = write_jsonl(train_records, out / "data" / "train.jsonl")
        eval_path = write_jsonl(records, out / "data" / "eval.jsonl")
        config = DataConfig(
            path=str(train_path),
            eval_path=str(eval_path),
            format="alpaca",
            max_seq_len=budget.max_seq_len,
        )
        data = load_data(config, tokenizer)
    evals = sorted(data.eval[: budget.n_eval], key=len)  # little padding in eval batches
    return data.train, evals, records


def _model(arm: Arm, seed: int, loftq_iters: int = 1) -> tuple[Any, Any]:
    import torch

    import qlora
    from qlora.config import LoraConfig, QuantConfig

    loftq, pissa = arm.init == "loftq", arm.init == "pissa"
    quant = None if loftq else arm.quant
    config = LoraConfig(
        **LORA,  # type: ignore[arg-type]
        init=arm.init,  # type: ignore[arg-type]
        loftq_iters=loftq_iters,
        use_dora=arm.dora,
    )
    split = None
    if pissa:  # each weight split as it streams in, the residual quantized (QPiSSA)
        from qlora.nn.pissa import PissaSplit

        split = PissaSplit(config, seed)
    model, tokenizer = qlora.load_model(
        "smollm2-135m",
        quant=quant,
        double_quant=arm.double_quant,
        compute_dtype=arm.compute_dtype,
        progress=False,
        split=split,
    )
    torch.manual_seed(seed)  # adapter initialization is part of the seeded run
    if arm.method == "full":
        for param in model.parameters():
            param.requires_grad_(True)
    elif split is not None:
        split.finish(model)
    else:
        qlora.add_lora(model, config)
        if loftq:  # quantize now, fitting the adapters to the quantization error
            quant_config = QuantConfig(
                kind=arm.quant, double_quant=arm.double_quant, compute_dtype=arm.compute_dtype
            )
            qlora.nn.init_loftq(model, config, quant_config, progress=False)
    return model, tokenizer


def _base_bits(model: Any) -> float:
    """Bits per parameter of the decoder's Linear weights (quantized or not)."""
    from qlora.nn import QuantLinear

    bits, params = 0.0, 0
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            state = module.quant_state
            bits, params = bits + 8 * state.storage_bytes(), params + state.numel
        elif type(module).__name__ == "Linear" and "lora_" not in name and "lm_head" not in name:
            params += module.weight.numel()
            bits += module.weight.numel() * module.weight.element_size() * 8
    return bits / max(params, 1)


def run_arm(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one (task, arm, seed) as ``spec`` says; returns and writes its result."""
    import torch

    from qlora.config import TrainConfig
    from qlora.data import BatchLoader, pad_id_of, score
    from qlora.procinfo import peak_rss_bytes
    from qlora.recipe import EpochBatches
    from qlora.train import evaluate, train

    start = time.perf_counter()
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    arm, budget = ARMS[spec["arm"]], Budget(**spec["budget"])
    task, seed, out = spec["task"], int(spec["seed"]), Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = _model(arm, seed, int(spec.get("loftq_iters", 1)))
    load_seconds = time.perf_counter() - start
    train_examples, eval_examples, eval_records = _data(task, spec["data"], budget, out, tokenizer)
    pad = pad_id_of(tokenizer)
    eval_batches = list(BatchLoader(eval_examples, 16, pad, shuffle=False))
    loader = BatchLoader(train_examples, budget.batch_size, pad, seed=seed, group_by_length=True)
    result: dict[str, Any] = {"task": task, "arm": arm.name, "seed": seed}
    result["eval_loss_before"] = evaluate(model, eval_batches)
    if eval_records is not None:
        with torch.no_grad():
            before = score(model, tokenizer, eval_records, budget.max_new_tokens)
        result["accuracy_before"] = before.accuracy
    config = TrainConfig(
        output_dir=str(out / "train"),  # a directory of its own (out holds the data)
        max_steps=budget.steps,
        batch_size=budget.batch_size,
        lr=budget.lr_full if arm.method == "full" else budget.lr_lora * arm.lr_scale,
        schedule="constant",
        warmup_steps=budget.warmup_steps,
        max_grad_norm=0.3,
        eval_every=budget.eval_every,
        log_every=max(1, budget.steps // 4),
        seed=seed,
    )
    # overwrite: a rerun of an arm killed midway starts it over in its own directory
    trained = train(
        model, config, EpochBatches(loader), eval_batches, overwrite=True, progress=True
    )
    result["eval_loss_after"] = trained.eval_loss
    result["curve"] = [[0, result["eval_loss_before"]]] + [
        [h["step"], h["eval_loss"]] for h in trained.history if "eval_loss" in h
    ]
    result["train_losses"] = [h["loss"] for h in trained.history if "loss" in h]
    if eval_records is not None:
        with torch.no_grad():
            after = score(model, tokenizer, eval_records, budget.max_new_tokens)
        result["accuracy_after"] = after.accuracy
        result["examples"] = [
            {"input": r["input"], "expected": a, "predicted": p}
            for r, a, p in zip(eval_records[:3], after.answers, after.predictions, strict=False)
        ]
    params = list(model.parameters())
    result.update(
        trainable_params=sum(p.numel() for p in params if p.requires_grad),
        total_params=sum(p.numel() for p in params),
        base_bits_per_param=_base_bits(model),
        peak_rss_mib=peak_rss_bytes() / 2**20,
        train_seconds=trained.seconds,
        train_tokens=trained.tokens,
        load_seconds=load_seconds,
        seconds=time.perf_counter() - start,
        budget=asdict(budget),
        threads=torch.get_num_threads(),
        loftq_iters=int(spec.get("loftq_iters", 1)) if arm.init == "loftq" else None,
    )
    path = out / "result.json"
    atomic_write(path, json.dumps(result, indent=1))
    return result
