"""The LoRA adapter GGUF: read back with gguf.GGUFReader, and applied by the real llama.cpp.

Exactness: for every layer, llama.cpp's scale (file alpha / r) · B_gguf · A_gguf must equal
our scaling · B · A once the q/k row permutation is undone - bit for bit where no scale had
to be folded into B (the default rank and alpha), to float32 rounding where it was.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from qlora import LoraConfig, add_lora, save_adapter
from qlora.adapters import AdapterFormatError, AdapterNotFoundError, ExportError
from qlora.export.gguf_adapter import export_adapter_gguf, llama_cpp_scale
from qlora.files import DestinationError
from qlora.models.gguf_names import unpermute_qk
from qlora.nn.inject import lora_layers
from tests.tiny_models import tiny_llama

gguf = pytest.importorskip("gguf")

_KINDS = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_output",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "down_proj": "ffn_down",
}


def randomize_b(model: torch.nn.Module, std: float, seed: int = 0) -> None:
    """B starts at zero; give it values so the adapter changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for name, linear in layer.lora_B.items():
                shape = linear.weight.shape
                linear.weight.copy_(torch.randn(shape, generator=generator) * std)
                del name


def vary_ranks(model: torch.nn.Module) -> None:
    """Give some layers another rank and/or alpha (-> rank_pattern / alpha_pattern)."""
    layers = dict(lora_layers(model))
    changes = {
        "model.layers.0.self_attn.q_proj": (8, 16.0),  # rank and alpha
        "model.layers.1.self_attn.k_proj": (2, 8.0),  # rank only
        "model.layers.1.mlp.down_proj": (4, 3.0),  # alpha only
    }
    config = model.lora_configs["default"]
    for name, (r, alpha) in changes.items():
        layers[name].delete_adapter("default")
        layers[name].add_adapter("default", r, alpha, 0.0, config.use_rslora, "kaiming")
        layers[name].set_adapter("default")


def make_adapter(
    directory: Path, *, rslora: bool = False, patterns: bool = False, seed: int = 0
) -> torch.nn.Module:
    model = tiny_llama(seed=seed)
    add_lora(model, LoraConfig(r=4, alpha=8.0, target_modules="all-linear", use_rslora=rslora))
    if patterns:
        vary_ranks(model)
    randomize_b(model, 0.02, seed)
    save_adapter(model, directory, base_model_name_or_path="/nonexistent/base")
    return model


def field(reader: object, key: str) -> object:
    return reader.fields[key].contents()


@pytest.mark.parametrize(
    ("rslora", "patterns"), [(False, False), (True, False), (False, True), (True, True)]
)
def test_reads_back_and_products_match(tmp_path: Path, rslora: bool, patterns: bool) -> None:
    model = make_adapter(tmp_path / "adapter", rslora=rslora, patterns=patterns)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert bool(config["rank_pattern"] or config["alpha_pattern"]) == patterns
    out = export_adapter_gguf(tmp_path / "adapter", tmp_path / "a.gguf", model=model)

    reader = gguf.GGUFReader(out)
    assert field(reader, "general.type") == "adapter"
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "adapter.type") == "lora"
    alpha = float(field(reader, "adapter.lora.alpha"))
    assert reader.fields["adapter.lora.alpha"].types == [gguf.GGUFValueType.FLOAT32]
    tensors = {t.name: t for t in reader.tensors}
    n_head, n_kv = model.config.num_attention_heads, model.config.num_key_value_heads
    layers = list(lora_layers(model))
    assert len(tensors) == 2 * len(layers) == 2 * 14
    for module, layer in layers:
        block, leaf = module.split(".")[2], module.split(".")[-1]
        name = f"blk.{block}.{_KINDS[leaf]}.weight"
        a = torch.from_numpy(np.array(tensors[name + ".lora_a"].data))
        b = torch.from_numpy(np.array(tensors[name + ".lora_b"].data))
        assert tensors[name + ".lora_a"].tensor_type == gguf.GGMLQuantizationType.F32
        ours_a = layer.lora_A["default"].weight.detach()  # [r, in]
        ours_b = layer.lora_B["default"].weight.detach()  # [out, r]
        assert a.shape == ours_a.shape and b.shape == ours_b.shape
        if leaf in ("q_proj", "k_proj"):
            b = unpermute_qk(b, n_head if leaf == "q_proj" else n_kv)
        assert torch.equal(a, ours_a)
        r = ours_a.shape[0]
        scale = layer.scaling["default"]
        assert scale == pytest.approx(_expected_scale(config, module, r), rel=1e-12)
        theirs = llama_cpp_scale(alpha, r) * (b.double() @ a.double())
        ours = scale * (ours_b.double() @ ours_a.double())
        if llama_cpp_scale(alpha, r) == np.float32(scale):
            assert torch.equal(b, ours_b), module  # nothing folded: copied exactly
        # B_gguf = round_f32(B · factor): each element within float32 rounding of B's
        file_b = llama_cpp_scale(alpha, r) * b.double()
        torch.testing.assert_close(file_b, scale * ours_b.double(), rtol=2**-23, atol=0)
        # the product, tolerance relative to its size (sums of r terms may cancel)
        torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-6 * float(ours.abs().max()))


def _expected_scale(config: dict, module: str, r: int) -> float:
    alpha = config["alpha_pattern"].get(module, config["lora_alpha"])
    return alpha / (math.sqrt(r) if config["use_rslora"] else r)


def test_q_and_k_rows_are_permuted(tmp_path: Path) -> None:
    """The permutation is not a no-op here (else the product test could not catch it)."""
    model = make_adapter(tmp_path / "adapter")
    out = export_adapter_gguf(tmp_path / "adapter", tmp_path / "a.gguf", model=model)
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    raw = torch.from_numpy(np.array(tensors["blk.0.attn_q.weight.lora_b"].data))
    ours = model.get_submodule("model.layers.0.self_attn.q_proj").lora_B["default"].weight
    assert not torch.equal(raw, ours.detach())
    v_raw = torch.from_numpy(np.array(tensors["blk.0.attn_v.weight.lora_b"].data))
    v_ours = model.get_submodule("model.layers.0.self_attn.v_proj").lora_B["default"].weight
    assert torch.equal(v_raw, v_ours.detach())


def test_base_from_a_checkpoint_directory(tmp_path: Path) -> None:
    """No model=: the base config comes from base_model_name_or_path (config only)."""
    model = tiny_llama(seed=1)
    model.save_pretrained(tmp_path / "base")
    add_lora(model, LoraConfig(r=4, alpha=8.0))
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    out = export_adapter_gguf(tmp_path / "adapter", tmp_path / "a.gguf")
    assert len(gguf.GGUFReader(out).tensors) == 28


def test_unloadable_base_says_pass_model(tmp_path: Path) -> None:
    make_adapter(tmp_path / "adapter")
    with pytest.raises(ExportError, match="pass the base model"):
        export_adapter_gguf(tmp_path / "adapter", tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()


def test_refuses_existing_file_unless_overwrite(tmp_path: Path) -> None:
    model = make_adapter(tmp_path / "adapter")
    (tmp_path / "a.gguf").write_text("mine")
    with pytest.raises(DestinationError, match="overwrite"):
        export_adapter_gguf(tmp_path / "adapter", tmp_path / "a.gguf", model=model)
    assert (tmp_path / "a.gguf").read_text() == "mine"
    export_adapter_gguf(tmp_path / "adapter", tmp_path / "a.gguf", model=model, overwrite=True)
    assert len(gguf.GGUFReader(tmp_path / "a.gguf").tensors) == 28


def test_corrupt_adapter_is_one_line_error_and_writes_nothing(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    model = make_adapter(tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in tensors if k.endswith("lora_B.weight"))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, weights)
    with pytest.raises(AdapterFormatError, match="NaN") as err:
        export_adapter_gguf(tmp_path / "adapter", tmp_path / "a.gguf", model=model)
    assert "\n" not in str(err.value)
    weights.write_bytes(b"garbage")
    with pytest.raises(AdapterFormatError):
        export_adapter_gguf(tmp_path / "adapter", tmp_path / "a.gguf", model=model)
    with pytest.raises(AdapterNotFoundError):
        export_adapter_gguf(tmp_path / "missing", tmp_path / "a.gguf", model=model)
    (tmp_path / "adapter" / "adapter_config.json").write_text("{")
    with pytest.raises(AdapterFormatError, match="not valid JSON"):
        export_adapter_gguf(tmp_path / "adapter", tmp_path / "a.gguf")  # base from config
    assert list(tmp_path.iterdir()) == [tmp_path / "adapter"]


def test_adapter_for_another_model_is_refused(tmp_path: Path) -> None:
    make_adapter(tmp_path / "adapter")
    other = tiny_llama(hidden=32, intermediate=64)
    with pytest.raises(AdapterFormatError, match="another base model"):
        export_adapter_gguf(tmp_path / "adapter", tmp_path / "a.gguf", model=other)


def test_unsupported_target_is_refused(tmp_path: Path) -> None:
    model = tiny_llama(seed=0)
    add_lora(model, LoraConfig(r=4, alpha=8.0, target_modules=["q_proj", "lm_head"]))
    save_adapter(model, tmp_path / "adapter")
    with pytest.raises(ExportError, match="lm_head"):
        export_adapter_gguf(tmp_path / "adapter", tmp_path / "a.gguf", model=model)
    assert not (tmp_path / "a.gguf").exists()


def test_unsupported_architecture_is_refused(tmp_path: Path) -> None:
    import transformers

    from qlora.models.gguf_names import UnsupportedArchitectureError

    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64)
    with torch.device("meta"):
        gpt2 = transformers.GPT2LMHeadModel(config)
    make_adapter(tmp_path / "adapter")
    with pytest.raises(UnsupportedArchitectureError, match="supported"):
        export_adapter_gguf(tmp_path / "adapter", tmp_path / "a.gguf", model=gpt2)


# -- the real llama.cpp --------------------------------------------------------------------
#
# The default model's float32 weights are its Q4_1 GGUF dequantized, so llama.cpp running
# that GGUF + our adapter GGUF should match our float32 model + the adapter. llama.cpp's
# CPU path multiplies Q4_1 weights by Q8-rounded activations, which alone moves logits by
# up to ~0.9 here; to check the adapter to a tight tolerance it also runs a float32 copy of
# the same GGUF (every tensor dequantized), where the base agrees to ~0.02.

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n",
    "Once upon a time, in a small village by the sea,",
]


def smollm2() -> tuple[torch.nn.Module, object, Path]:
    """Our float32 default model (its GGUF dequantized), its tokenizer, and that GGUF."""
    from qlora import load_model
    from qlora.models.registry import registered_path

    model, tokenizer = load_model("smollm2-135m", quant=None, progress=False)
    return model, tokenizer, registered_path("smollm2-135m")


def dequantized_copy(gguf_path: Path, out: Path) -> Path:
    """The GGUF with every tensor dequantized to F32 by the gguf package, metadata copied."""
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(gguf_path)
    writer = gguf.GGUFWriter(out, str(field(reader, "general.architecture")))
    for key, value in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        sub = value.types[1] if value.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value.contents(), value.types[0], sub_type=sub)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for tensor in reader.tensors:
        data = dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        writer.add_tensor(tensor.name, data.reshape(tuple(reversed(tensor.shape.tolist()))))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


@pytest.fixture(scope="module")
def f32_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("llama_cpp")
    from qlora.models.registry import registered_path

    path = registered_path("smollm2-135m")
    return dequantized_copy(path, tmp_path_factory.mktemp("f32") / "smollm2-f32.gguf")


def _llama_logits(gguf_path: Path, lora: Path | None, prompts: list[list[int]]) -> torch.Tensor:
    """llama.cpp's logits at every position [tokens, vocab], for our token ids (so no
    tokenizer difference enters), with the adapter applied when ``lora`` is given."""
    from llama_cpp import Llama

    kwargs = {"lora_path": str(lora)} if lora is not None else {}
    # logits_all: without it llama-cpp-python keeps no logits (sampling is in C)
    llm = Llama(
        model_path=str(gguf_path),
        n_ctx=256,
        n_threads=2,
        logits_all=True,
        verbose=False,
        **kwargs,
    )
    rows = []
    for ids in prompts:
        llm.reset()
        llm.eval(ids)
        rows.append(torch.tensor(np.array(llm.scores[: len(ids)]), dtype=torch.float64))
    llm.close()
    return torch.cat(rows)


def _our_logits(model: torch.nn.Module, prompts: list[list[int]]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(torch.tensor([ids])).logits[0].double() for ids in prompts])


def _compare(theirs: torch.Tensor, ours: torch.Tensor, last: list[int]) -> dict[str, float]:
    """max |dlogit| and top-1 agreement, at the prompts' last positions and at all;
    top1_clear: at the positions whose top-2 margin (ours) exceeds 0.1 (no near-ties)."""
    top2 = ours.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.1
    same = theirs.argmax(-1) == ours.argmax(-1)
    return {
        "top1_clear": same[clear].double().mean().item(),
        "max_dlogit_last": (theirs[last] - ours[last]).abs().max().item(),
        "max_dlogit": (theirs - ours).abs().max().item(),
        "top1_last": (theirs[last].argmax(-1) == ours[last].argmax(-1)).double().mean().item(),
        "top1": (theirs.argmax(-1) == ours.argmax(-1)).double().mean().item(),
    }


@pytest.mark.llama
@pytest.mark.parametrize("kind", ["plain", "rslora", "patterns"])
def test_llama_cpp_applies_the_adapter_as_we_do(tmp_path: Path, kind: str, f32_copy: Path) -> None:
    from qlora.nn.inject import disable_adapters

    model, tokenizer, q4_1 = smollm2()
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    last = list(np.cumsum([len(ids) for ids in prompts]) - 1)
    add_lora(
        model, LoraConfig(r=4, alpha=8.0, target_modules="all-linear", use_rslora=kind == "rslora")
    )
    if kind == "patterns":
        _vary_default_model(model)
    randomize_b(model, 0.04, seed=3)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path="smollm2-135m")
    out = export_adapter_gguf(tmp_path / "adapter", tmp_path / "adapter.gguf")

    ours = _our_logits(model, prompts)
    with disable_adapters(model):
        ours_off = _our_logits(model, prompts)
    effect = (ours - ours_off).abs().max().item()  # what the adapter changes
    assert effect > 1.0  # the adapter measurably changes the output
    assert (ours.argmax(-1) != ours_off.argmax(-1)).any()

    f32 = _compare(_llama_logits(f32_copy, out, prompts), ours, last)
    f32_off = _compare(_llama_logits(f32_copy, None, prompts), ours_off, last)
    q41 = _compare(_llama_logits(q4_1, out, prompts), ours, last)
    q41_off = _compare(_llama_logits(q4_1, None, prompts), ours_off, last)
    print(f"\n{kind}: adapter effect max|dlogit| {effect:.3f}")
    for name, row in [("f32", f32), ("f32 off", f32_off), ("Q4_1", q41), ("Q4_1 off", q41_off)]:
        print(f"  {name:9s} " + ", ".join(f"{k} {v:.4f}" for k, v in row.items()))
    # float32 base: a wrong scale or permutation would be an error the size of the effect
    assert f32["max_dlogit"] < 0.05 < effect
    assert f32["top1_clear"] == 1.0 and f32["top1_last"] == 1.0
    # Q4_1 base: the adapter adds no error beyond llama.cpp's own quantization noise
    assert q41["max_dlogit"] < q41_off["max_dlogit"] + 0.5
    assert q41["top1"] >= 0.85


def _vary_default_model(model: torch.nn.Module) -> None:
    layers = dict(lora_layers(model))
    use_rslora = model.lora_configs["default"].use_rslora
    changes = {
        "model.layers.0.self_attn.q_proj": (8, 16.0),
        "model.layers.3.self_attn.k_proj": (2, 8.0),
        "model.layers.5.mlp.down_proj": (4, 2.0),
        "model.layers.7.self_attn.v_proj": (16, 4.0),
    }
    for name, (r, alpha) in changes.items():
        layers[name].delete_adapter("default")
        layers[name].add_adapter("default", r, alpha, 0.0, use_rslora, "kaiming")
        layers[name].set_adapter("default")
