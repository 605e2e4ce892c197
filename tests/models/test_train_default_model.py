"""The main job on the real default model, for a few steps (in CI): QLoRA-train SmolLM2-135M
in nf4 through `qlora train`'s code path, save the adapter, load it onto a fresh base,
generate, and merge into a full-precision checkpoint that plain transformers loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qlora.config import RunConfig, load_run_config
from qlora.data import make_task_dataset, write_jsonl
from qlora.models import REGISTRY, ModelLoadError, load_model
from qlora.nn.inject import float32_compute
from qlora.recipe import run_training

transformers = pytest.importorskip("transformers")
try:
    REGISTRY["smollm2-135m"].locate()
except ModelLoadError as err:
    pytest.skip(str(err), allow_module_level=True)


def _task_config(tmp_path: Path, n_train: int, n_eval: int, *overrides: str) -> RunConfig:
    """A run over freshly generated reversal records in ``tmp_path`` (batch 2, one thread)."""
    torch.set_num_threads(1)  # tiny batches: one thread is faster and steadier on 2 cores
    train, evals = make_task_dataset(n_train, n_eval, seed=0)
    write_jsonl(train, tmp_path / "train.jsonl")
    write_jsonl(evals, tmp_path / "eval.jsonl")
    data = [f"data.path={tmp_path / 'train.jsonl'}", f"data.eval_path={tmp_path / 'eval.jsonl'}"]
    run = [f"train.output_dir={tmp_path / 'run'}", "train.batch_size=2"]
    return load_run_config(None, [*data, *run, *overrides])


def test_train_save_reload_generate_merge(tmp_path: Path, capsys) -> None:
    config = _task_config(
        tmp_path,
        16,
        4,
        "train.max_steps=3",
        "train.lr=1e-3",
        "train.warmup_steps=0",
        "train.save_every=2",
    )
    result = run_training(config, progress=False)
    run = tmp_path / "run"
    losses = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in losses if "loss" in r] == [1, 2, 3]
    assert result.train.eval_loss is not None and (run / "loss.png").is_file()
    assert (run / "checkpoint-2" / "state.json").is_file()
    adapter = result.adapter_dir
    assert (adapter / "adapter_config.json").is_file()
    assert (adapter / "adapter_model.safetensors").is_file()

    # A fresh nf4 base + the saved adapter gives the trained model's logits.
    from qlora.adapters import load_adapter

    fresh, tok = load_model("smollm2-135m", config.quant, progress=False)  # same compute dtype
    load_adapter(fresh, adapter)
    ids = tok("Reverse the order of these words.", return_tensors="pt").input_ids
    trained = result.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, trained(ids).logits, rtol=0, atol=1e-5)
        out = fresh.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids.shape[1]

    # qlora eval: loss and perplexity with and without the adapter.
    from qlora.cli import main

    capsys.readouterr()
    assert main(["eval", "--data", str(tmp_path / "eval.jsonl"), "--adapter", str(adapter)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" loss")[0].strip() for line in lines[-2:]] == ["base", "base + adapter"]

    # qlora merge: a full-precision checkpoint that plain transformers loads, and the drift.

    code = main(["merge", str(tmp_path / "merged"), "--adapter", str(adapter)])
    assert code == 0
    assert "drift" in capsys.readouterr().out
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad(), float32_compute(trained):  # the merge's error, not bf16 compute's
        drift = (merged(ids).logits - trained(ids).logits).abs().max().item()
    assert drift < 1e-3


def test_loftq_recipe_trains_and_its_adapter_loads_on_a_plain_base(tmp_path: Path) -> None:
    """``lora.init=loftq`` through `qlora train`'s code path: the model is loaded in full
    precision, quantized while the adapters are fitted (LoftQ on q/v, plain elsewhere), trained;
    with one round the saved adapter gives the same logits over a normally loaded nf4 base."""
    from qlora.adapters import load_adapter
    from qlora.nn import LoRALinear, QuantLinear

    config = _task_config(
        tmp_path,
        8,
        2,
        "train.max_steps=1",
        "lora.init=loftq",
        "lora.target_modules=[q_proj, v_proj]",
    )
    result = run_training(config, progress=False)
    model = result.model.eval()
    layers = dict(model.named_modules())
    assert isinstance(layers["model.layers.0.self_attn.q_proj"], LoRALinear)
    assert isinstance(layers["model.layers.0.self_attn.q_proj"].base_layer, QuantLinear)
    assert isinstance(layers["model.layers.0.mlp.down_proj"], QuantLinear)
    assert result.train.eval_loss is not None and result.train.eval_loss == result.train.eval_loss

    fresh, tok = load_model("smollm2-135m", config.quant, progress=False)  # same compute dtype
    load_adapter(fresh, result.adapter_dir)
    ids = tok("Reverse the order of these words.", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=0, atol=1e-4)
