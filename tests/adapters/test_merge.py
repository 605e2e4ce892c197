"""Merged exports load with plain transformers and compute what base + adapter computes; for a
QLoRA adapter the delta lands on the dequantized 4-bit weight, never the original one."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from qlora.adapters import ExportError, export_merged, measure_drift, merged_state_dict
from qlora.config import LoraConfig, QuantConfig
from qlora.files import DestinationError
from qlora.nn import LoRALinear, QuantLinear, add_lora, delta_weight, quantize_model, set_adapter
from tests.adapters.helpers import VOCAB, adapted_llama, input_ids, logits, max_diff, randomize
from tests.tiny_models import tiny_llama

transformers = pytest.importorskip("transformers")

Q_PROJ = "model.layers.0.self_attn.q_proj"


def _load(directory: Path) -> torch.nn.Module:
    """from_pretrained with loading info; fails on any missing, unexpected or mismatched key."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' own deprecation chatter
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            directory, output_loading_info=True
        )
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert info["mismatched_keys"] == set() and not info["error_msgs"]
    return model.eval()


def _tokenizer() -> object:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, VOCAB)}}
    inner = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=inner, unk_token="[UNK]")


@pytest.mark.compat
@pytest.mark.parametrize("tied", [False, True])
def test_fp32_export_loads_with_transformers_and_matches(tmp_path: Path, tied: bool) -> None:
    model = adapted_llama(tied=tied)
    report = export_merged(model, tmp_path, _tokenizer(), check_input_ids=input_ids())
    assert report.drift is not None and report.drift <= 1e-4
    assert report.merged_layers == 14 and report.dequantized_layers == 0
    names = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json"} <= names
    assert "tokenizer.json" in names
    merged = _load(tmp_path)
    assert max_diff(logits(merged), logits(model)) <= 1e-4
    assert merged.config.tie_word_embeddings is tied
    keys = set(merged_state_dict(model))
    assert ("lm_head.weight" in keys) is not tied  # a tied head is written once, as HF does
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert tokenizer("w3 w7")["input_ids"] == [3, 7]


@pytest.mark.compat
def test_qlora_export_uses_dequantized_weights(tmp_path: Path) -> None:
    original = tiny_llama(seed=0)
    model = quantize_model(tiny_llama(seed=0), QuantConfig(kind="nf4", compute_dtype="float32"))
    randomize(add_lora(model, LoraConfig(r=4, alpha=8.0, dropout=0.0)))
    report = export_merged(model, tmp_path, check_input_ids=input_ids())
    print(f"nf4 merged export: {report}")
    assert report.dequantized_layers == 14 and report.drift is not None and report.drift <= 1e-4
    config = json.loads((tmp_path / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"

    merged = _load(tmp_path)
    layer = model.get_submodule(Q_PROJ)
    assert isinstance(layer, LoRALinear) and isinstance(layer.base_layer, QuantLinear)
    expected = layer.base_layer.dequantized_weight(torch.float32) + delta_weight(layer, "default")
    written = merged.get_submodule(Q_PROJ).weight
    assert torch.allclose(written, expected, atol=1e-6, rtol=0)
    naive = original.get_submodule(Q_PROJ).weight + delta_weight(layer, "default")
    assert max_diff(written, naive) > 1e-3  # not folded into the 16/32-bit original
    drift = measure_drift(model, merged, input_ids())
    assert drift == pytest.approx(report.drift, abs=1e-6) and drift <= 1e-4


def test_merged_state_dict_leaves_the_model_alone() -> None:
    model = adapted_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reference = logits(model)
    state = merged_state_dict(model)
    assert not any("lora_" in k or "base_layer" in k for k in state)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert torch.equal(logits(model), reference)


def test_merge_a_named_adapter_and_dtype(tmp_path: Path) -> None:
    model = adapted_llama(adapter_seed=1)
    add_lora(model, LoraConfig(r=2, alpha=2.0, dropout=0.0), adapter_name="b")
    randomize(model, "b", seed=2)
    set_adapter(model, "default")
    only_b = merged_state_dict(model, adapter="b")
    layer = model.get_submodule(Q_PROJ)
    expected = layer.base_layer.weight + delta_weight(layer, "b")
    assert torch.allclose(only_b[f"{Q_PROJ}.weight"], expected, atol=1e-6)
    half = merged_state_dict(model, dtype=torch.bfloat16)
    assert {t.dtype for t in half.values()} == {torch.bfloat16}
    set_adapter(model, "b")
    report = export_merged(model, tmp_path, adapter="b", verbose=False)
    assert report.drift is None
    assert max_diff(logits(_load(tmp_path)), logits(model)) <= 1e-4


def test_export_errors(tmp_path: Path) -> None:
    model = adapted_llama()
    with pytest.raises(ExportError, match=r"unknown adapter\(s\) \['nope'\].*\['default'\]"):
        export_merged(model, tmp_path / "a", adapter="nope")
    clash = tmp_path / "clash"
    clash.mkdir()
    (clash / "adapter_config.json").write_text("{}")
    with pytest.raises(DestinationError, match=r"clash is not empty .*adapter_config\.json"):
        export_merged(model, clash)
    # from_pretrained would load the adapter on top of the merged model: refused with
    # overwrite too, and the file is the user's to remove
    with pytest.raises(DestinationError, match=r"holds adapter_config\.json.*nothing is deleted"):
        export_merged(model, clash, overwrite=True)
    assert [p.name for p in clash.iterdir()] == ["adapter_config.json"]
    with pytest.raises(ExportError, match=r"has no \.config"):
        export_merged(torch.nn.Linear(2, 2), tmp_path / "b")


@pytest.mark.compat
def test_adapted_tied_head_is_untied_in_the_export(tmp_path: Path) -> None:
    model = adapted_llama(tied=True, target_modules=["lm_head", "q_proj"])
    export_merged(model, tmp_path, verbose=False)
    merged = _load(tmp_path)
    assert merged.config.tie_word_embeddings is False
    assert max_diff(logits(merged), logits(model)) <= 1e-4
    # exporting again into the same directory with overwrite replaces the files in place
    export_merged(adapted_llama(adapter_seed=3), tmp_path, verbose=False, overwrite=True)
    assert max_diff(logits(_load(tmp_path)), logits(adapted_llama(adapter_seed=3))) <= 1e-4
