"""Adapter files against the real PEFT: ours load in PEFT, PEFT's load in ours, the same logits
either way; several adapters on one base; the files written and replaced safely."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import ModuleType

import pytest
import torch

import qlora.adapters.peft_format as peft_format
from qlora.adapters import adapter_config, load_adapter, save_adapter
from qlora.config import LoraConfig, QuantConfig
from qlora.nn import LoRALinear, add_lora, lora_layers, quantize_model, set_adapter
from tests.adapters.helpers import PROJECTIONS, adapted_llama, logits, max_diff, randomize
from tests.tiny_models import tiny_llama


@pytest.fixture
def peft() -> ModuleType:
    """The real PEFT; the tests that need it skip without it (extra ``compat``)."""
    return pytest.importorskip("peft")


TOL = 1e-4


def _peft_model(
    peft: ModuleType, directory: Path, seed: int = 0, **kwargs: object
) -> torch.nn.Module:
    """A PEFT LoRA model on tiny_llama(seed) with random (non-zero) A and B, saved to directory."""
    config = peft.LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **kwargs)
    torch.manual_seed(123)
    model = peft.get_peft_model(tiny_llama(seed=seed), config)
    model.save_pretrained(directory)
    return model


@pytest.mark.compat
def test_our_adapter_loads_in_peft_with_same_logits(tmp_path: Path, peft: ModuleType) -> None:
    model = adapted_llama()
    save_adapter(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == PROJECTIONS  # all-linear, resolved to sorted leaf names
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (4, 8, "LORA")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no missing/unexpected-key warnings
        theirs = peft.PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path)
    assert max_diff(logits(theirs), logits(model)) <= TOL
    assert max_diff(logits(theirs), logits(tiny_llama(seed=0))) > 1e-2  # the adapter matters


@pytest.mark.compat
def test_config_keys_are_peft_s(tmp_path: Path, peft: ModuleType) -> None:
    save_adapter(adapted_llama(use_rslora=True), tmp_path, base_model_name_or_path="tiny")
    ours = json.loads((tmp_path / "adapter_config.json").read_text())
    theirs = peft.LoraConfig().to_dict()
    assert set(ours) <= set(theirs)
    if peft.__version__.startswith("0.21."):
        assert set(ours) == set(theirs) - {"peft_version"}
    loaded = peft.LoraConfig.from_pretrained(tmp_path)
    assert (loaded.r, loaded.lora_alpha, loaded.use_rslora) == (4, 8, True)
    assert loaded.base_model_name_or_path == "tiny"


@pytest.mark.compat
def test_peft_adapter_loads_in_ours_with_same_logits(tmp_path: Path, peft: ModuleType) -> None:
    theirs = _peft_model(peft, tmp_path, r=4, lora_alpha=8, target_modules="all-linear")
    model = tiny_llama(seed=0)
    assert load_adapter(model, tmp_path) == "default"
    assert len(list(lora_layers(model))) == 14
    assert max_diff(logits(model), logits(theirs)) <= TOL


@pytest.mark.compat
def test_rank_and_alpha_patterns_round_trip_with_peft(tmp_path: Path, peft: ModuleType) -> None:
    theirs = _peft_model(
        peft,
        tmp_path / "peft",
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"q_proj": 2},
        alpha_pattern={"down_proj": 3},
        use_rslora=True,
    )
    model = tiny_llama(seed=0)
    load_adapter(model, tmp_path / "peft")
    q = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert q.lora_A["default"].out_features == 2
    assert max_diff(logits(model), logits(theirs)) <= TOL
    # and back: ours writes per-layer ranks/alphas as patterns that PEFT reads the same way
    save_adapter(model, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["use_rslora"] is True
    assert set(config["rank_pattern"].values()) == {2}
    again = peft.PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path / "ours")
    assert max_diff(logits(again), logits(theirs)) <= TOL


@pytest.mark.compat
def test_partial_targets_write_suffixes_peft_resolves_identically(
    tmp_path: Path, peft: ModuleType
) -> None:
    # only layer 0's attention: leaf names would wrongly select layer 1 in PEFT
    model = adapted_llama(target_modules=r"model\.layers\.0\.self_attn\..*")
    save_adapter(model, tmp_path)
    targets = json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]
    assert targets == [f"0.self_attn.{p}" for p in ("k_proj", "o_proj", "q_proj", "v_proj")]
    theirs = peft.PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path)
    adapted = {n for n, m in theirs.named_modules() if hasattr(m, "lora_A")}
    assert len(adapted) == 4 and all(".layers.0.self_attn." in n for n in adapted)
    assert max_diff(logits(theirs), logits(model)) <= TOL


@pytest.mark.compat
def test_two_adapters_on_one_base_switch_by_name(tmp_path: Path) -> None:
    first = adapted_llama(adapter_seed=1)
    second = adapted_llama(adapter_seed=2, r=2, alpha=5.0, target_modules=["q_proj", "v_proj"])
    save_adapter(first, tmp_path / "a")
    save_adapter(second, tmp_path / "b")
    model = tiny_llama(seed=0)
    load_adapter(model, tmp_path / "a", name="a")
    load_adapter(model, tmp_path / "b", name="b")
    # as in PEFT, loading a second adapter does not switch to it
    assert max_diff(logits(model), logits(first)) <= TOL
    set_adapter(model, "b")
    assert max_diff(logits(model), logits(second)) <= TOL
    set_adapter(model, "a")
    assert max_diff(logits(model), logits(first)) <= TOL
    # a second adapter saved from the shared model keeps its own layers and rank
    save_adapter(model, tmp_path / "b2", adapter="b")
    config = json.loads((tmp_path / "b2" / "adapter_config.json").read_text())
    assert (config["target_modules"], config["r"], config["lora_alpha"]) == (
        ["q_proj", "v_proj"],
        2,
        5,
    )


def test_trainable_flag(tmp_path: Path) -> None:
    save_adapter(adapted_llama(), tmp_path)
    frozen = tiny_llama(seed=0)
    load_adapter(frozen, tmp_path)
    assert not any(p.requires_grad for p in frozen.parameters())
    training = tiny_llama(seed=0)
    load_adapter(training, tmp_path, trainable=True)
    names = {n for n, p in training.named_parameters() if p.requires_grad}
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)


def test_load_onto_quantized_base_matches(tmp_path: Path) -> None:
    nf4 = QuantConfig(kind="nf4")
    model = quantize_model(tiny_llama(seed=0), nf4)
    randomize(add_lora(model, LoraConfig(r=4, alpha=8.0, dropout=0.0)))
    save_adapter(model, tmp_path)
    fresh = quantize_model(tiny_llama(seed=0), nf4)
    load_adapter(fresh, tmp_path)
    assert max_diff(logits(fresh), logits(model)) <= TOL


def test_adapter_config_reports_gaussian_init_and_dropout() -> None:
    model = adapted_llama(init="gaussian", dropout=0.1)
    config = adapter_config(model)
    assert config["init_lora_weights"] == "gaussian" and config["lora_dropout"] == 0.1
    assert config["inference_mode"] is True and config["task_type"] == "CAUSAL_LM"


def test_save_keeps_other_files_and_replaces_adapter(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    save_adapter(adapted_llama(adapter_seed=1), tmp_path, overwrite=True)
    save_adapter(adapted_llama(adapter_seed=2), tmp_path, overwrite=True)
    assert (tmp_path / "metrics.jsonl").read_text() == "{}\n"
    model = tiny_llama(seed=0)
    load_adapter(model, tmp_path)
    assert max_diff(logits(model), logits(adapted_llama(adapter_seed=2))) <= TOL
    for where in (tmp_path, tmp_path.parent):  # staging: inside an existing dir, else beside
        assert sorted(p.name for p in where.iterdir() if p.name.endswith(".tmp")) == []


def test_failed_save_loses_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "adapter"
    save_adapter(adapted_llama(adapter_seed=1), target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def broken(path: Path, *args: object, **kwargs: object) -> None:
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(peft_format, "write_safetensors", broken)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(adapted_llama(adapter_seed=2), target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no staging left behind
    with pytest.raises(OSError):
        save_adapter(adapted_llama(), tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_keys_have_peft_prefix_and_no_adapter_name(tmp_path: Path) -> None:
    from safetensors import safe_open

    model = adapted_llama()
    model.get_submodule("model.layers.0.self_attn.q_proj")  # exists
    save_adapter(model, tmp_path)
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
        assert f.metadata() == {"format": "pt"}
    assert len(keys) == 28
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert not any(".default." in k for k in keys)
    assert all(isinstance(m, LoRALinear) for _, m in lora_layers(model))
