"""Pre-quantized checkpoints we write load in transformers + bitsandbytes and in ours."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from qlora.models import load_model
from qlora.models.export import save_quantized
from qlora.nn import QuantLinear
from tests.bnb_peer import bnb_exact_logits, check_bnb_inference_logits
from tests.conftest import requires_bnb
from tests.tiny_models import tiny_llama

transformers = pytest.importorskip("transformers")


def _source(tmp_path: Path, tied: bool) -> Path:
    model = tiny_llama(hidden=128, intermediate=256, vocab=200, tied=tied, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path / "src")
    return tmp_path / "src"


def _ids() -> torch.Tensor:
    return torch.randint(0, 200, (2, 9), generator=torch.Generator().manual_seed(0))


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(_ids()).logits


@pytest.mark.parametrize("kind", ["nf4", "int8", "nf2"])
@pytest.mark.parametrize("tied", [False, True])
def test_round_trip_through_our_loader_is_byte_exact(tmp_path: Path, kind: str, tied: bool) -> None:
    model, _ = load_model(_source(tmp_path, tied), quant=kind, tokenizer=False, progress=False)
    out = save_quantized(model, tmp_path / "q")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["bnb_4bit_quant_type"] == kind
    assert config["quant_method"] == ("bitsandbytes" if kind == "nf4" else "qlora")
    again, _ = load_model(out, quant=kind, tokenizer=False, progress=False)
    assert again.qlora_load_info.prequantized
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            assert torch.equal(again.get_submodule(name).weight, module.weight), name
    assert torch.equal(_logits(again), _logits(model))
    assert (again.lm_head.weight is again.model.embed_tokens.weight) == tied


@requires_bnb
@pytest.mark.compat
@pytest.mark.parametrize("tied", [False, True])
def test_transformers_bitsandbytes_loads_our_nf4_checkpoint(tmp_path: Path, tied: bool) -> None:
    model, _ = load_model(_source(tmp_path, tied), quant="nf4", tokenizer=False, progress=False)
    out = save_quantized(model, tmp_path / "q")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peer = transformers.AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    assert type(peer.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    ours = _logits(model)
    assert torch.equal(bnb_exact_logits(peer, _ids()), ours)
    check_bnb_inference_logits(peer, _ids(), ours)


def test_model_without_quantized_layers_is_an_error(tmp_path: Path) -> None:
    model, _ = load_model(_source(tmp_path, False), quant=None, tokenizer=False, progress=False)
    with pytest.raises(ValueError, match="no quantized layers"):
        save_quantized(model, tmp_path / "q")
    assert not (tmp_path / "q").exists()
