"""The memory estimator: parameter counts, method ordering, activations against autograd."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import qlora
from qlora.cli import main
from qlora.config import ConfigError
from qlora.memory import (
    METHODS,
    PUBLISHED_TABLE,
    SIZES,
    MemoryEstimate,
    estimate,
    layer_saved_tensors,
    model_shape,
    quant_storage,
    quantized_bytes,
)
from tests.tiny_models import tiny_llama as build_tiny_llama

transformers = pytest.importorskip("transformers")

LLAMA2_7B_CONFIG = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
}


def tiny_llama(tied: bool = False, attention: str = "sdpa") -> torch.nn.Module:
    return build_tiny_llama(vocab=256, tied=tied, attn_implementation=attention).train()


def saved_activation_bytes(model: torch.nn.Module, ids: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves during a forward with labels.

    Parameters and buffers (frozen weights, QuantLinear's packed codes) are already resident
    and are not activations, so their storages are left out.
    """
    resident = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in resident:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(input_ids=ids, labels=ids).loss
    assert loss.requires_grad
    return sum(storages.values())


# -- parameters ------------------------------------------------------------------------------


def test_7b_parameter_count_from_size_and_config(tmp_path: Path) -> None:
    assert estimate("7b", "full-16").params == pytest.approx(6.74e9, rel=0.01)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA2_7B_CONFIG))
    assert model_shape(path) == model_shape(tmp_path)  # a directory holding config.json
    assert estimate(path, "full-16").params == estimate("7b", "full-16").params


def test_published_sizes_have_their_known_parameter_counts() -> None:
    expected = {"13b": 13.0e9, "70b": 69.0e9, "8x7b": 46.7e9, "8x22b": 140.6e9, "135m": 134.5e6}
    for size, params in expected.items():
        assert SIZES[size].params() == pytest.approx(params, rel=0.01), size


@pytest.mark.parametrize("tied", [False, True])
def test_module_and_its_config_count_the_real_parameters(tmp_path: Path, tied: bool) -> None:
    model = tiny_llama(tied=tied)
    real = sum(p.numel() for p in model.parameters())
    assert estimate(model, "full-16").params == real
    model.config.save_pretrained(tmp_path)
    assert estimate(tmp_path / "config.json", "full-16").params == real


def test_module_weights_count_quantlinear_buffers_and_adapters_as_found() -> None:
    model = qlora.quantize_model(tiny_llama(), qlora.QuantConfig(kind="nf4"))
    model = qlora.add_lora(model, qlora.LoraConfig(r=4))
    resident = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    trainable = [p for p in model.parameters() if p.requires_grad]
    result = estimate(model, "qlora-4", rank=64)  # the model's own r=4 wins
    assert result.rank == 4
    assert result.trainable_params == sum(p.numel() for p in trainable)
    assert result.weights + result.adapters == resident
    assert result.params == qlora.trainable_report(model).total - result.trainable_params


def test_unquantized_module_is_counted_as_quantize_model_would_store_it() -> None:
    plain = tiny_llama()
    quantized = qlora.quantize_model(tiny_llama(), qlora.QuantConfig(kind="nf4"))
    assert estimate(plain, "qlora-4").weights == estimate(quantized, "qlora-4").weights


@pytest.mark.parametrize("kind", ["nf4", "int8", "nf2"])
@pytest.mark.parametrize("numel", [1, 63, 64 * 256 * 8, 576 * 192, 1000 * 77 + 3])
def test_quantized_bytes_is_what_quantize_stores(kind: str, numel: int) -> None:
    state = qlora.quantize(torch.randn(numel), kind, 64, True)
    assert quantized_bytes(numel, kind) == state.storage_bytes()


def test_quant_storage_bits_per_parameter() -> None:
    per_element, per_tensor = quant_storage("nf4")
    n = 64 * 256 * 8
    assert per_element * n + per_tensor == quantized_bytes(n, "nf4")
    assert 8 * per_element == pytest.approx(4.127, abs=1e-3)
    assert 8 * quant_storage("int8")[0] == pytest.approx(8.127, abs=1e-3)
    assert 8 * quant_storage("nf2")[0] == pytest.approx(2.127, abs=1e-3)


# -- ordering and settings -------------------------------------------------------------------


@pytest.mark.parametrize("size", ["7b", "70b", "8x7b"])
def test_methods_are_ordered_by_memory(size: str) -> None:
    totals = [estimate(size, method, grad_ckpt=True).total for method in METHODS]
    assert totals == sorted(totals, reverse=True), dict(zip(METHODS, totals, strict=True))
    assert tuple(PUBLISHED_TABLE) == METHODS


@pytest.mark.parametrize("method", ["full-16", "lora-16", "qlora-4"])
def test_gradient_checkpointing_reduces_activations(method: str) -> None:
    kwargs = {"batch": 4, "seq_len": 1024, "chunked_loss": True}
    plain = estimate("7b", method, grad_ckpt=False, **kwargs)
    ckpt = estimate("7b", method, grad_ckpt=True, **kwargs)
    assert ckpt.activations < plain.activations / 4
    assert ckpt.total < plain.total


def test_activations_grow_linearly_with_tokens() -> None:
    one = estimate("7b", "qlora-4", batch=1, seq_len=512)
    two = estimate("7b", "qlora-4", batch=2, seq_len=512)
    assert two.saved_for_backward == pytest.approx(2 * one.saved_for_backward, rel=1e-3)


def test_full_logits_cost_three_float32_copies() -> None:
    full = estimate("7b", "qlora-4", batch=4, seq_len=2048, grad_ckpt=True, chunked_loss=False)
    chunked = estimate("7b", "qlora-4", batch=4, seq_len=2048, grad_ckpt=True)
    assert full.logits >= 3 * 4 * 2048 * 32000 * 4
    assert chunked.total < full.total


def test_optimizers() -> None:
    adamw = estimate("7b", "qlora-4", optimizer="adamw")
    assert adamw.optimizer_states == 8 * adamw.trainable_params
    assert adamw.gradients == 4 * adamw.trainable_params
    eight = estimate("7b", "qlora-4", optimizer="adamw8bit")
    assert eight.optimizer_states == pytest.approx(2.03125 * eight.trainable_params, rel=1e-6)
    assert estimate("7b", "qlora-4", optimizer="sgd").optimizer_states == 0
    paged = estimate("7b", "qlora-4", optimizer="paged_adamw")  # CUDA: two 64 MiB pages resident
    assert paged.optimizer_states == 128 << 20
    assert paged.offloaded == adamw.optimizer_states - (128 << 20)
    assert paged.total == adamw.total - paged.offloaded
    assert any("paged" in note for note in paged.notes)
    on_cpu = estimate("7b", "qlora-4", optimizer="paged_adamw8bit", device="cpu")
    assert on_cpu.optimizer_states == 64 << 20  # one page of the memory-mapped file
    assert on_cpu.offloaded == eight.optimizer_states - (64 << 20)
    full = estimate("7b", "full-amp")
    assert full.weights == 6 * full.params and full.optimizer_states == 8 * full.params


def test_str_is_a_breakdown_in_gib() -> None:
    result = estimate("7b", "qlora-4", grad_ckpt=True)
    assert isinstance(result, MemoryEstimate)
    text = str(result)
    for label in ("weights", "adapters", "gradients", "optimizer", "activations", "total"):
        assert label in text
    assert f"{result.total / 2**30:.3f} GiB" in text
    assert result.total == sum(nbytes for label, nbytes in result.rows() if label != "total")


# -- activations against autograd ------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "dropout", "attention"),
    [
        ("qlora-4", 0.05, "sdpa"),
        ("lora-16", 0.0, "sdpa"),
        ("lora-16", 0.1, "eager"),
        ("full-16", 0.0, "sdpa"),
    ],
)
def test_saved_tensors_match_the_derivation(method: str, dropout: float, attention: str) -> None:
    model = tiny_llama(attention=attention)
    if method.startswith("qlora"):
        model = qlora.quantize_model(model, qlora.QuantConfig(kind="nf4"))
    if not method.startswith("full"):
        config = qlora.LoraConfig(r=8, alpha=16, dropout=dropout)
        model = qlora.add_lora(model, config)
    model.train()
    batch, seq_len = 2, 32
    ids = torch.randint(0, 256, (batch, seq_len))
    measured = saved_activation_bytes(model, ids)
    result = estimate(model, method, batch=batch, seq_len=seq_len, chunked_loss=False, device="cpu")  # type: ignore[arg-type]
    assert result.saved_for_backward == pytest.approx(measured, rel=0.15)
    # The derivation is meant to be exact, not just within tolerance.
    assert result.saved_for_backward == pytest.approx(measured, rel=0.01)


def test_bfloat16_lora_keeps_float32_adapter_inputs() -> None:
    shape = SIZES["7b"]
    fp32 = layer_saved_tensors(shape, batch=1, seq_len=512, compute_dtype="float32")
    bf16 = layer_saved_tensors(shape, batch=1, seq_len=512, compute_dtype="bfloat16")
    assert any("dropout output" in t.name for t in bf16)
    assert sum(t.nbytes for t in bf16) < sum(t.nbytes for t in fp32)


# -- errors and the command line -------------------------------------------------------------


def test_bad_inputs_name_the_value_and_the_choices(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'9b'.*7b.*8x22b"):
        estimate("9b")
    with pytest.raises(ConfigError, match=r"'qlora-3'.*'qlora-4'"):
        estimate("7b", "qlora-3")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"'adam'.*'adamw8bit'"):
        estimate("7b", optimizer="adam")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"no config\.json"):
        estimate(tmp_path)
    with pytest.raises(ConfigError, match="batch"):
        estimate("7b", batch=0)
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ConfigError, match="intermediate_size"):
        estimate(bad)


def test_cli_estimate_one_model(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["estimate", "--model", "7b", "--method", "qlora-4", "--batch", "1", "--seq-len"]
    assert main([*argv, "512", "--rank", "16", "--optim", "adamw", "--grad-ckpt"]) == 0
    out = capsys.readouterr().out
    assert "Llama-2-7B" in out and "total" in out and "gradient checkpointing" in out


def test_cli_estimate_tables(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["estimate"]) == 0
    out = capsys.readouterr().out
    assert "8x22b" in out and "qlora-2" in out
    assert main(["estimate", "--compare-table"]) == 0
    out = capsys.readouterr().out
    assert out.count("x)") == 6 * 7  # ours / published (ratio) for every cell


def test_cli_estimate_bad_model_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["estimate", "--model", "9b"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "'9b'" in err


def test_estimate_per_rank_under_ddp_and_fsdp() -> None:
    from qlora.memory import estimate

    settings = {"batch": 1, "seq_len": 2048, "grad_ckpt": True}
    one = estimate("70b", "qlora-4", **settings)
    assert estimate("70b", "qlora-4", world_size=1, parallel="fsdp", **settings) == one
    ddp = estimate("70b", "qlora-4", world_size=2, parallel="ddp", **settings)
    assert ddp.total == one.total  # the whole model; gradients in DDP's buckets
    fsdp2 = estimate("70b", "qlora-4", world_size=2, parallel="fsdp", **settings)
    fsdp8 = estimate("70b", "qlora-4", world_size=8, parallel="fsdp", **settings)
    assert one.weights / 2 < fsdp2.weights < 0.6 * one.weights  # half + the gathered layers
    assert fsdp2.optimizer_states == one.optimizer_states // 2
    assert fsdp8.total < fsdp2.total < one.total
    assert fsdp2.activations == one.activations  # batch is per rank
    offload = estimate(
        "70b", "qlora-4", world_size=2, parallel="fsdp", cpu_offload=True, **settings
    )
    assert offload.total < fsdp2.total / 3 and offload.offloaded > one.weights / 2
    assert "per rank of 2 (fsdp)" in str(fsdp2)
    with pytest.raises(ConfigError, match="cpu_offload"):
        estimate("70b", "qlora-4", world_size=2, parallel="ddp", cpu_offload=True)
    with pytest.raises(ConfigError, match="parallel"):
        estimate("70b", "qlora-4", world_size=2, parallel="zero3")  # type: ignore[arg-type]


def test_estimate_cli_world_size(capsys: pytest.CaptureFixture[str]) -> None:
    from qlora.cli import main

    assert main(["estimate", "--model", "70b", "--world-size", "4", "--parallel", "fsdp"]) == 0
    assert "per rank of 4 (fsdp)" in capsys.readouterr().out
