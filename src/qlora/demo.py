"""The two-command demo's main job: QLoRA-teach SmolLM2-135M a task it cannot do, on a CPU.

1. Generate the word-reversal task (`qlora.data.tasks`: "Reverse the order of these
   words." + four common words; exact-match scored), 400 training and 50 held-out records.
2. Load the default model quantized to NF4 with double quantization, add LoRA (r=16,
   α=32) on every linear layer, and train with the QLoRA recipe (AdamW, constant LR after
   warmup, grad clipping 0.3) through the same code path as ``qlora train``.
3. Score the held-out records greedily (on the batch decoder, `qlora.generate.greedy_decoder`)
   with the adapters disabled (the base model) and enabled, print both accuracies and a few
   side-by-side answers; the adapter (PEFT format), metrics.jsonl and loss.png stay in the
   output directory.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from qlora.config import load_run_config

if TYPE_CHECKING:
    from qlora.train.run_dir import RunDirectory

__all__ = ["run_demo"]


def run_demo(output_dir: str = "out/demo", steps: int = 40, n_eval: int = 50) -> dict:
    """Run the demo; returns the measured numbers (also printed)."""
    from qlora.train.run_dir import claim_output_dir

    out = Path(output_dir)
    # The demo's directory is its own: a rerun starts over in it (an earlier demo's files are
    # replaced), but a folder holding anything else is refused like any training's.
    with claim_output_dir(out, overwrite=True) as run_dir:
        return _demo_in(run_dir, steps, n_eval)


def _demo_in(run_dir: RunDirectory, steps: int, n_eval: int) -> dict:
    import torch

    from qlora.data import make_task_dataset, score, write_jsonl
    from qlora.generate import greedy_decoder
    from qlora.nn import disable_adapters
    from qlora.recipe import run_training

    start = time.perf_counter()
    out = run_dir.path
    train_records, eval_records = make_task_dataset(400, n_eval, seed=0)
    write_jsonl(train_records, out / "data" / "train.jsonl")
    write_jsonl(eval_records, out / "data" / "eval.jsonl")
    first = train_records[0]
    print(
        f"task: {first['instruction']!r}, e.g. {first['input']!r} -> {first['output']!r}; "
        f"{len(train_records)} train / {n_eval} held-out records"
    )
    config = load_run_config(
        None,
        [
            f"data.path={out / 'data' / 'train.jsonl'}",
            f"data.eval_path={out / 'data' / 'eval.jsonl'}",
            f"train.output_dir={out}",
            f"train.max_steps={steps}",
            "train.batch_size=8",
            "train.lr=1e-3",
            "train.warmup_steps=4",
            "train.eval_every=10",
        ],
    )
    t_train = time.perf_counter()
    run = run_training(config, run_dir=run_dir)
    train_seconds = time.perf_counter() - t_train
    model, tok = run.model, run.tokenizer
    model.eval()
    t_eval = time.perf_counter()
    decode = greedy_decoder(model)  # the batch decoder, 8 prompts at a time
    with torch.no_grad():
        with disable_adapters(model):
            before = score(model, tok, eval_records, decode=decode)
        after = score(model, tok, eval_records, decode=decode)
    eval_seconds = time.perf_counter() - t_eval
    print("\nheld-out examples (base | fine-tuned | expected):")
    for i in range(5):
        print(f"  {eval_records[i]['input']!r}")
        print(f"    base:       {before.predictions[i]!r}")
        print(f"    fine-tuned: {after.predictions[i]!r}")
        print(f"    expected:   {after.answers[i]!r}")
    total = time.perf_counter() - start
    results = {
        "base_accuracy": before.accuracy,
        "finetuned_accuracy": after.accuracy,
        "n_eval": n_eval,
        "steps": run.train.steps,
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        "total_seconds": total,
    }
    print(
        f"\nexact match on {n_eval} held-out records: base {before.n_correct}/{n_eval} "
        f"({before.accuracy:.0%}) -> QLoRA fine-tuned {after.n_correct}/{n_eval} "
        f"({after.accuracy:.0%})\n"
        f"training {train_seconds:.0f} s ({run.train.steps} steps), evaluation "
        f"{eval_seconds:.0f} s, demo total {total:.0f} s\n"
        f"adapter: {run.adapter_dir}  loss plot: {out / 'loss.png'}  "
        f"metrics: {out / 'metrics.jsonl'}"
    )
    return results
