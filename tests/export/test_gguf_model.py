"""The merged GGUF export read back with the real peer, ``gguf.GGUFReader``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
import transformers

from qlora.adapters.merge import merged_state_dict
from qlora.config import LoraConfig, QuantConfig
from qlora.export import gguf_model
from qlora.export.gguf_model import GGUFExportError, export_gguf, quantize_rows
from qlora.files import DestinationError
from qlora.models.gguf_names import (
    ARCHITECTURES,
    UnsupportedArchitectureError,
    gguf_arch,
    gguf_tensor_name,
    permute_qk,
    unpermute_qk,
)
from qlora.nn import add_lora, quantize_model
from tests.adapters.helpers import randomize
from tests.tiny_models import tiny_llama

Q = gguf.GGMLQuantizationType
LLAMA = ARCHITECTURES["LlamaForCausalLM"]


def _model(tokenizer: Any, **config: Any) -> torch.nn.Module:
    return tiny_llama(seed=0, vocab=len(tokenizer), **config)


def _export(model: torch.nn.Module, tmp_path: Path, tokenizer: Any, type: str) -> gguf.GGUFReader:
    path = export_gguf(model, tmp_path / f"m-{type}.gguf", tokenizer, type=type, progress=False)
    return gguf.GGUFReader(path)


def _ours(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """Our merged tensors under GGUF names, q/k rows still in HF order."""
    n = model.config.num_hidden_layers
    return {
        gguf_tensor_name(k, LLAMA, n): v.float().numpy()
        for k, v in merged_state_dict(model, dtype=torch.float32).items()
    }


def _hf_order(name: str, data: np.ndarray, model: torch.nn.Module) -> np.ndarray:
    """Undo llama.cpp's q/k permutation of a read-back tensor."""
    c = model.config
    heads = {"attn_q": c.num_attention_heads, "attn_k": c.num_key_value_heads}
    for part, n in heads.items():
        if f".{part}." in name:
            return unpermute_qk(torch.from_numpy(np.array(data)), n).numpy()
    return np.array(data)


def _fields(reader: gguf.GGUFReader) -> dict[str, Any]:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def test_permutation_matches_a_loop_reference() -> None:
    rows = torch.randn(48, 5)  # 3 heads of 16 rows
    n_head, d = 3, 16
    expected = torch.empty_like(rows)
    for h in range(n_head):
        for i in range(d // 2):
            for j in range(2):  # pair (i, j) <- half j, row i
                expected[h * d + 2 * i + j] = rows[h * d + j * d // 2 + i]
    assert torch.equal(permute_qk(rows, n_head), expected)
    assert torch.equal(unpermute_qk(expected, n_head), rows)
    assert torch.equal(permute_qk(rows[:, 0], n_head), expected[:, 0])  # a bias


def test_f32_metadata_tensors_and_values_exact(tmp_path: Path, tokenizer: Any) -> None:
    model = _model(tokenizer)
    reader = _export(model, tmp_path, tokenizer, "f32")
    fields = _fields(reader)
    c = model.config
    expected = {
        "general.architecture": "llama",
        "general.type": "model",
        "general.file_type": int(gguf.LlamaFileType.ALL_F32),
        "llama.context_length": c.max_position_embeddings,
        "llama.embedding_length": 64,
        "llama.block_count": 2,
        "llama.feed_forward_length": 128,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.vocab_size": len(tokenizer),
        "llama.rope.dimension_count": 16,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.bos_token_id": tokenizer.bos_token_id,
        "tokenizer.ggml.eos_token_id": tokenizer.eos_token_id,
        "tokenizer.ggml.padding_token_id": tokenizer.pad_token_id,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": tokenizer.chat_template,
    }
    assert {k: fields.get(k) for k in expected} == expected
    assert fields["llama.rope.freq_base"] == pytest.approx(10000.0)
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(c.rms_norm_eps)
    vocab = tokenizer.get_vocab()
    assert fields["tokenizer.ggml.tokens"] == [
        t for t, _ in sorted(vocab.items(), key=lambda x: x[1])
    ]
    types = fields["tokenizer.ggml.token_type"]
    assert types[:3] == [gguf.TokenType.CONTROL] * 3 and set(types[3:]) == {gguf.TokenType.NORMAL}
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    assert fields["tokenizer.ggml.merges"] == [" ".join(m) for m in merges]
    ours = _ours(model)
    assert sorted(t.name for t in reader.tensors) == sorted(ours)
    for t in reader.tensors:
        assert t.tensor_type == Q.F32
        np.testing.assert_array_equal(_hf_order(t.name, t.data, model), ours[t.name], t.name)


def test_f16_and_bf16_keep_norms_f32(tmp_path: Path, tokenizer: Any) -> None:
    model = _model(tokenizer)
    ours = _ours(model)
    for type, qtype in (("f16", Q.F16), ("bf16", Q.BF16)):
        reader = _export(model, tmp_path, tokenizer, type)
        for t in reader.tensors:
            flat = t.name.endswith("_norm.weight")
            assert t.tensor_type == (Q.F32 if flat else qtype), t.name
            got = _hf_order(t.name, gguf.quants.dequantize(t.data, t.tensor_type), model)
            want = ours[t.name]
            if type == "f16" and not flat:
                want = want.astype(np.float16).astype(np.float32)  # f16 rounding, exactly
            if type == "bf16" and not flat:
                want = gguf.quants.dequantize(gguf.quants.quantize(want, Q.BF16), Q.BF16)
            np.testing.assert_array_equal(got, want, t.name)


@pytest.mark.parametrize(("type", "qtype"), [("q8_0", Q.Q8_0), ("q4_0", Q.Q4_0), ("q4_1", Q.Q4_1)])
def test_quantized_equal_gguf_quantize(tmp_path: Path, tokenizer: Any, type: str, qtype: Q) -> None:
    model = _model(tokenizer, hidden=64, intermediate=128)
    reader = _export(model, tmp_path, tokenizer, type)
    n = model.config.num_hidden_layers
    c = model.config
    permuted = {
        gguf_tensor_name(k, LLAMA, n): (
            permute_qk(v.float(), c.num_attention_heads if "q_proj" in k else c.num_key_value_heads)
            if ("q_proj" in k or "k_proj" in k)
            else v.float()
        ).numpy()
        for k, v in merged_state_dict(model, dtype=torch.float32).items()
    }
    for t in reader.tensors:
        want_type = Q.F32 if t.name.endswith("_norm.weight") else qtype
        if qtype != Q.Q8_0 and t.name == "output.weight":
            want_type = Q.Q8_0  # the head stays 8-bit, as llama.cpp's quantizer
        assert t.tensor_type == want_type, t.name
        if want_type == Q.F32:
            continue
        expected = gguf.quants.quantize(permuted[t.name], want_type)
        np.testing.assert_array_equal(np.array(t.data).reshape(-1), expected.reshape(-1), t.name)
        back = gguf.quants.dequantize(t.data, want_type)
        scale = np.abs(permuted[t.name]).max()
        tol = 0.01 if want_type == Q.Q8_0 else 0.15  # half a step of the block max
        assert np.abs(back - permuted[t.name]).max() <= tol * scale, t.name


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1])
def test_quantize_rows_is_gguf_quantize_byte_for_byte(
    monkeypatch: pytest.MonkeyPatch, qtype: Q
) -> None:
    rng = np.random.default_rng(0)
    data = rng.standard_normal((37, 128)).astype(np.float32)  # [out, in]
    data[3, :32] = 0.0  # an all-zero block (scale 0)
    data[5, 7] = 40.0  # an outlier that sets its block's scale
    # 3 rows per call: 12 full groups and a last group of 1 row
    monkeypatch.setattr(gguf_model, "QUANTIZE_CHUNK_ELEMENTS", 3 * 128 + 5)
    got = quantize_rows(data, qtype)
    want = gguf.quants.quantize(data, qtype)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert got.tobytes() == want.tobytes()
    flat = data[0]  # [n]: one call, unchanged
    assert quantize_rows(flat, qtype).tobytes() == gguf.quants.quantize(flat, qtype).tobytes()


def test_adapter_merged_into_dequantized_base(tmp_path: Path, tokenizer: Any) -> None:
    model = quantize_model(_model(tokenizer), QuantConfig(kind="nf4"))
    model = randomize(add_lora(model, LoraConfig(r=4, alpha=8.0, dropout=0.0)))
    ours = _ours(model)  # B·A folded into the dequantized NF4 weight
    plain = _ours(_model(tokenizer))
    reader = _export(model, tmp_path, tokenizer, "f32")
    q = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    got = _hf_order(q.name, q.data, model)
    np.testing.assert_array_equal(got, ours[q.name])
    assert not np.allclose(got, plain[q.name], atol=1e-3)  # the adapter and NF4 did change it


def test_fast_merge_is_merged_weight_bit_for_bit(tokenizer: Any) -> None:
    from qlora.nn.lora import LoRALinear, merge_adapter, merged_weight

    model = quantize_model(_model(tokenizer), QuantConfig(kind="nf4"))
    model = randomize(add_lora(model, LoraConfig(r=4, alpha=8.0, dropout=0.0, use_rslora=True)))
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    delta = gguf_model._DeltaBuffer()  # shared by every layer, as in the export
    results = []
    for layer in layers:
        make = gguf_model._fast_merge(layer, delta)
        assert make is not None
        results.append(make())
    # The buffer is reused across layers and shapes: every result must still be its own.
    for layer, result in zip(layers, results, strict=True):
        assert torch.equal(result, merged_weight(layer))
    layers[0].disabled = True  # the base alone, still the fast path
    assert torch.equal(gguf_model._fast_merge(layers[0], delta)(), merged_weight(layers[0]))
    # Merged in place, or non-float32 adapters: the merge plan's reference path.
    merge_adapter(layers[1])
    assert gguf_model._fast_merge(layers[1], delta) is None
    layers[2].lora_A["default"].to(torch.bfloat16)
    assert gguf_model._fast_merge(layers[2], delta) is None
    assert gguf_model._fast_merge(torch.nn.Linear(4, 4), delta) is None


def test_tied_head_is_not_written_and_untied_is(tmp_path: Path, tokenizer: Any) -> None:
    tied = _export(_model(tokenizer, tied=True), tmp_path, tokenizer, "q4_0")
    names = {t.name: t.tensor_type for t in tied.tensors}
    assert "output.weight" not in names and names["token_embd.weight"] == Q.Q8_0
    untied = _export(_model(tokenizer), tmp_path / "..", tokenizer, "f16")
    assert "output.weight" in {t.name for t in untied.tensors}


def test_qwen2_biases_unpermuted_and_mistral_is_llama(tmp_path: Path, tokenizer: Any) -> None:
    common = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
    )
    torch.manual_seed(0)
    qwen = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common)).eval()
    reader = _export(qwen, tmp_path, tokenizer, "f32")
    assert _fields(reader)["general.architecture"] == "qwen2"
    q = {t.name: np.array(t.data) for t in reader.tensors}
    attn = qwen.model.layers[0].self_attn
    np.testing.assert_array_equal(q["blk.0.attn_q.weight"], attn.q_proj.weight.detach().numpy())
    np.testing.assert_array_equal(q["blk.0.attn_k.bias"], attn.k_proj.bias.detach().numpy())
    mistral = transformers.MistralForCausalLM(transformers.MistralConfig(**common)).eval()
    (tmp_path / "m").mkdir()
    assert (
        _fields(_export(mistral, tmp_path / "m", tokenizer, "f32"))["general.architecture"]
        == "llama"
    )
    assert gguf_arch(transformers.MistralConfig()).name == "llama"


def test_errors_are_one_line_and_write_nothing(tmp_path: Path, tokenizer: Any) -> None:
    model = _model(tokenizer)
    out = tmp_path / "m.gguf"
    with pytest.raises(GGUFExportError, match=r"unknown GGUF type 'q5_k'; choose one of f32, "):
        export_gguf(model, out, tokenizer, type="q5_k")
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2))
    with pytest.raises(UnsupportedArchitectureError, match=r"'GPT2LMHeadModel'.*supported: Llama"):
        export_gguf(gpt2, out, tokenizer)
    yarn = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}
    with pytest.raises(GGUFExportError, match="rope scaling 'yarn' is not supported by the GGUF"):
        export_gguf(_model(tokenizer, rope_parameters=yarn), out, tokenizer)
    assert list(tmp_path.iterdir()) == []
    out.write_bytes(b"mine")
    with pytest.raises(DestinationError, match="exists; choose another path, or pass --overwrite"):
        export_gguf(model, out, tokenizer, progress=False)
    assert out.read_bytes() == b"mine"
    export_gguf(model, out, tokenizer, type="f32", overwrite=True, progress=False)
    assert gguf.GGUFReader(out).fields["general.architecture"].contents() == "llama"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # no temp file left
