"""Model surgery on tiny random Hugging Face models: target selection, add_lora, freezing,
the trainable report, quantize_model, adapter switching and model-level merge."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qlora.config import LoraConfig, QuantConfig
from qlora.nn import (
    LoRALinear,
    QuantLinear,
    TrainableReport,
    add_lora,
    disable_adapters,
    find_targets,
    lora_layers,
    merge,
    quantize_model,
    set_adapter,
    trainable_report,
)

transformers = pytest.importorskip("transformers")

HIDDEN, LAYERS, VOCAB, INTER, HEADS, KV_HEADS = 64, 2, 128, 128, 4, 2
HEAD_DIM = HIDDEN // HEADS
KV = KV_HEADS * HEAD_DIM
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# (in, out) of each projection in one decoder layer.
SHAPES = {
    "q_proj": (HIDDEN, HIDDEN),
    "k_proj": (HIDDEN, KV),
    "v_proj": (HIDDEN, KV),
    "o_proj": (HIDDEN, HIDDEN),
    "gate_proj": (HIDDEN, INTER),
    "up_proj": (HIDDEN, INTER),
    "down_proj": (INTER, HIDDEN),
}
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
}


def tiny_model(family: str = "llama", seed: int = 0) -> nn.Module:
    config_cls, model_cls = (getattr(transformers, n) for n in FAMILIES[family])
    config = config_cls(
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        vocab_size=VOCAB,
        intermediate_size=INTER,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return model_cls(config).eval()


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(seed))


def _randomize_b(model: nn.Module, seed: int = 1) -> None:
    """B starts at zero; make every adapter change the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for b in layer.lora_B.values():
                b.weight.copy_(torch.randn(b.weight.shape, generator=gen) * 0.05)


def _lora_param_names(model: nn.Module) -> set[str]:
    return {n for n, _ in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}


def _lora_count(r: int, names: tuple[str, ...] = PROJECTIONS) -> int:
    """Hand count: each adapted layer adds r·in (A) + r·out (B) parameters."""
    return LAYERS * sum(r * (SHAPES[n][0] + SHAPES[n][1]) for n in names)


# -- find_targets ----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_all_linear_selects_seven_projections_per_layer_not_the_head(family: str) -> None:
    model = tiny_model(family)
    targets = find_targets(model, "all-linear")
    assert len(targets) == 7 * LAYERS
    assert sorted(targets) == sorted(
        f"model.layers.{i}.{'self_attn' if p[0] in 'qkvo' else 'mlp'}.{p}"
        for i in range(LAYERS)
        for p in PROJECTIONS
    )
    assert "lm_head" not in targets


def test_all_linear_without_get_output_embeddings_skips_module_named_lm_head() -> None:
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(4, 4))
    model.add_module("lm_head", nn.Linear(4, 8))
    assert find_targets(model, "all-linear") == ["proj"]


def test_list_targets_use_peft_suffix_rule() -> None:
    model = tiny_model()
    assert find_targets(model, ["q_proj", "v_proj"]) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    ]
    # An exact full name works; a partial component ("proj") does not match "q_proj".
    assert find_targets(model, ["model.layers.1.mlp.up_proj"]) == ["model.layers.1.mlp.up_proj"]
    with pytest.warns(UserWarning, match=r"\['proj'\] matched no Linear"):
        partial = find_targets(model, ["self_attn.o_proj", "proj"])
    assert partial == ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]


def test_regex_targets_fullmatch_the_full_name() -> None:
    model = tiny_model()
    assert find_targets(model, r".*\.1\.mlp\.(gate|up)_proj") == [
        "model.layers.1.mlp.gate_proj",
        "model.layers.1.mlp.up_proj",
    ]
    with pytest.raises(ValueError):
        find_targets(model, r"q_proj")  # fullmatch: a bare suffix is not a full name


def test_exclude() -> None:
    model = tiny_model()
    targets = find_targets(model, "all-linear", exclude=["down_proj", "model.layers.0.mlp.up_proj"])
    assert len(targets) == 7 * LAYERS - 3
    assert not any(t.endswith("down_proj") for t in targets)
    assert "model.layers.0.mlp.up_proj" not in targets
    assert "model.layers.1.mlp.up_proj" in targets
    assert find_targets(model, ["q_proj"], exclude=r"model\.layers\.0\..*") == [
        "model.layers.1.self_attn.q_proj"
    ]


def test_unknown_target_error_names_targets_and_lists_linears() -> None:
    model = tiny_model()
    with pytest.raises(ValueError) as err:
        find_targets(model, ["c_attn", "query"])
    message = str(err.value)
    assert "c_attn" in message and "query" in message
    assert "model.layers.0.self_attn.q_proj" in message
    assert "gate_proj" in message
    with pytest.raises(ValueError, match="c_attn"):
        add_lora(model, LoraConfig(target_modules=["c_attn"]))


def test_targets_on_lora_model_are_the_wrappers_not_their_inner_linears() -> None:
    model = tiny_model()
    before = find_targets(model, "all-linear")
    add_lora(model, LoraConfig(r=2))
    assert find_targets(model, "all-linear") == before
    for inner in (["base_layer"], ["default"], ["lora_A.default"]):
        with pytest.raises(ValueError):
            find_targets(model, inner)


# -- add_lora ------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_add_lora_all_linear_wraps_freezes_and_reports(
    family: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """add_lora wraps and freezes; it prints nothing (the caller prints `trainable_report`)."""
    model = tiny_model(family)
    base_total = sum(p.numel() for p in model.parameters())
    config = LoraConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    assert add_lora(model, config) is model

    wrapped = dict(lora_layers(model))
    assert len(wrapped) == 7 * LAYERS
    assert not isinstance(model.lm_head, LoRALinear)
    assert isinstance(model.model.layers[1].mlp.down_proj, LoRALinear)
    assert "model.layers.0.self_attn.q_proj.base_layer.weight" in model.state_dict()
    assert "model.layers.0.self_attn.q_proj.lora_A.default.weight" in model.state_dict()

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == _lora_param_names(model)

    report = trainable_report(model)
    assert report == TrainableReport(trainable=_lora_count(4), total=base_total + _lora_count(4))
    assert report.percent == pytest.approx(100 * report.trainable / report.total)
    assert model.lora_configs == {"default": config}
    assert capsys.readouterr().out == ""
    assert str(report) == (
        f"trainable params: {_lora_count(4):,d} || all params: {base_total + _lora_count(4):,d} "
        f"|| trainable%: {100 * _lora_count(4) / (base_total + _lora_count(4)):.4f}"
    )


@pytest.mark.parametrize("family", list(FAMILIES))
def test_backward_reaches_only_lora_params(family: str) -> None:
    model = tiny_model(family)
    add_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0))
    fresh = tiny_model(family)
    ids = _ids()
    # B = 0, so a fresh adapter reproduces the base logits exactly.
    torch.testing.assert_close(model(ids).logits, fresh(ids).logits)
    model.train()
    model(ids, labels=ids).loss.backward()
    lora = _lora_param_names(model)
    for name, param in model.named_parameters():
        if name in lora:
            assert param.grad is not None, name
        else:
            assert param.grad is None, name
    # A's gradient is B-weighted, so only B gets a signal on the first step (B = 0).
    assert all(
        torch.count_nonzero(p.grad) > 0 for n, p in model.named_parameters() if ".lora_B." in n
    )


def test_add_lora_list_targets_count() -> None:
    model = tiny_model()
    base_total = sum(p.numel() for p in model.parameters())
    add_lora(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    assert (
        sorted(n.rsplit(".", 1)[-1] for n, _ in lora_layers(model))
        == ["q_proj"] * 2 + ["v_proj"] * 2
    )
    expected = _lora_count(8, ("q_proj", "v_proj"))
    assert trainable_report(model) == TrainableReport(expected, base_total + expected)


def test_second_adapter_joins_existing_layers_and_becomes_the_trainable_one() -> None:
    model = tiny_model()
    add_lora(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    add_lora(model, LoraConfig(r=2, target_modules=["v_proj", "o_proj"]), "second")
    layers = dict(lora_layers(model))
    assert len(layers) == 6
    v_proj = layers["model.layers.0.self_attn.v_proj"]
    assert v_proj.adapter_names == ["default", "second"]
    assert layers["model.layers.0.self_attn.q_proj"].adapter_names == ["default"]
    assert layers["model.layers.0.self_attn.o_proj"].adapter_names == ["second"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".second." in n for n in trainable)
    assert trainable_report(model).trainable == _lora_count(2, ("v_proj", "o_proj"))
    assert set(model.lora_configs) == {"default", "second"}

    set_adapter(model, "default")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)
    assert layers["model.layers.0.self_attn.o_proj"].active_adapters == []
    with pytest.raises(ValueError, match="unknown adapter"):
        set_adapter(model, "third")


def test_set_adapter_and_disable_adapters_change_logits() -> None:
    model = tiny_model()
    base_logits = model(_ids()).logits
    add_lora(model, LoraConfig(r=4, dropout=0.0, target_modules=["q_proj", "up_proj"]))
    add_lora(model, LoraConfig(r=4, dropout=0.0, target_modules=["v_proj"]), "b")
    _randomize_b(model)
    ids = _ids()
    logits_b = model(ids).logits
    set_adapter(model, "default")
    logits_default = model(ids).logits
    assert not torch.allclose(logits_b, logits_default)
    assert not torch.allclose(logits_default, base_logits)

    with disable_adapters(model):
        torch.testing.assert_close(model(ids).logits, base_logits)
    torch.testing.assert_close(model(ids).logits, logits_default)

    with pytest.raises(RuntimeError, match="boom"), disable_adapters(model):
        raise RuntimeError("boom")
    assert not any(layer.disabled for _, layer in lora_layers(model))
    torch.testing.assert_close(model(ids).logits, logits_default)

    # A layer disabled before entering stays disabled after leaving.
    first = next(layer for _, layer in lora_layers(model))
    first.disabled = True
    with disable_adapters(model):
        pass
    assert first.disabled
    assert sum(layer.disabled for _, layer in lora_layers(model)) == 1


# -- quantize_model --------------------------------------------------------------------------------


def test_quantize_model_kind_none_is_a_no_op() -> None:
    model = tiny_model()
    assert quantize_model(model, QuantConfig(kind=None)) is model
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


def test_qlora_on_tiny_llama_forward_backward_and_logits_close() -> None:
    reference = tiny_model()
    model = tiny_model()
    base_total = sum(p.numel() for p in model.parameters())
    quantize_model(model, QuantConfig(kind="nf4", blocksize=64, double_quant=True))
    quantized = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == 7 * LAYERS
    assert isinstance(model.lm_head, nn.Linear)
    assert not any(isinstance(m, QuantLinear) for m in model.lm_head.modules())

    add_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0))
    assert all(isinstance(layer.base_layer, QuantLinear) for _, layer in lora_layers(model))
    report = trainable_report(model)
    assert report == TrainableReport(_lora_count(4), base_total + _lora_count(4))

    ids = _ids()
    ref_logits = reference(ids).logits
    logits = model(ids).logits
    # NF4 keeps about 10% RMS error per Gaussian weight, and that is roughly the relative
    # logit error (measured ~0.09); an unrelated model is off by more than 100%.
    rel = (logits - ref_logits).norm() / ref_logits.norm()
    assert 0 < rel < 0.25, rel
    unrelated = tiny_model(seed=1)(ids).logits
    assert (unrelated - ref_logits).norm() / ref_logits.norm() > 0.5
    model.train()
    model(ids, labels=ids).loss.backward()
    lora = _lora_param_names(model)
    assert all((p.grad is not None) == (n in lora) for n, p in model.named_parameters())

    with pytest.raises(ValueError, match="quantize_model first"):
        quantize_model(model, QuantConfig(kind="nf4"))


# -- merge -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_model_merge_reproduces_lora_logits(family: str) -> None:
    model = tiny_model(family)
    add_lora(model, LoraConfig(r=4, alpha=8, dropout=0.1))
    _randomize_b(model)
    model.eval()
    ids = _ids()
    expected = model(ids).logits
    biases = {
        n: layer.base_layer.bias.clone()
        for n, layer in lora_layers(model)
        if layer.base_layer.bias is not None
    }
    assert merge(model) is model
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert not any(".lora_" in k or ".base_layer." in k for k in model.state_dict())
    q_proj = model.model.layers[0].self_attn.q_proj
    assert type(q_proj) is nn.Linear and q_proj.weight.dtype == torch.float32
    for name, bias in biases.items():
        torch.testing.assert_close(model.get_submodule(name).bias, bias)
    assert (family == "qwen2") == bool(biases)
    torch.testing.assert_close(model(ids).logits, expected)
    assert model.lora_configs == {}


def test_model_merge_of_qlora_model_dequantizes() -> None:
    model = tiny_model()
    quantize_model(model, QuantConfig(kind="nf4", compute_dtype="float32"))
    add_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0))
    _randomize_b(model)
    ids = _ids()
    expected = model(ids).logits
    merge(model)
    assert not any(isinstance(m, QuantLinear | LoRALinear) for m in model.modules())
    torch.testing.assert_close(model(ids).logits, expected)


def test_model_merge_named_adapter_and_inactive_layers() -> None:
    model = tiny_model()
    reference = tiny_model()
    add_lora(model, LoraConfig(r=4, dropout=0.0, target_modules=["q_proj"]))
    add_lora(model, LoraConfig(r=4, dropout=0.0, target_modules=["k_proj"]), "b")
    _randomize_b(model)
    ids = _ids()
    set_adapter(model, "default")
    expected = model(ids).logits
    merge(model, adapter="default")
    torch.testing.assert_close(model(ids).logits, expected)
    # k_proj carried only "b": merged without it, so it is the original weight.
    torch.testing.assert_close(
        model.model.layers[0].self_attn.k_proj.weight,
        reference.model.layers[0].self_attn.k_proj.weight,
    )


def test_public_names_are_exported() -> None:
    import qlora.nn

    assert set(qlora.nn.__all__) >= {
        "QuantLinear",
        "LoRALinear",
        "find_targets",
        "add_lora",
        "trainable_report",
        "TrainableReport",
        "quantize_model",
        "set_adapter",
        "disable_adapters",
        "merge",
        "lora_layers",
        "replace_module",
        "init_loftq",
        "LoftQReport",
        "delta_weight",
        "merged_weight",
        "merge_adapter",
        "unmerge_adapter",
    }
    assert all(hasattr(qlora.nn, n) for n in qlora.nn.__all__)


def test_add_lora_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    add_lora(tiny_model(), LoraConfig(r=2))
    assert capsys.readouterr().out == ""


def test_inject_and_loftq_do_not_import_each_other_both_ways() -> None:
    """nn.loftq builds on nn.inject; nn.inject never imports nn.loftq (not even lazily)."""
    import ast
    import inspect

    import qlora.nn.inject

    tree = ast.parse(inspect.getsource(qlora.nn.inject))
    imported = {
        node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
    } | {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    assert not any("loftq" in name for name in imported), imported
