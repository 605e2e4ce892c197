"""Adapter precision: float32 / bfloat16 / float16 are plain PEFT files (the real PEFT loads
them), int8 is our blockwise extension (ours loads it, PEFT fails loudly), and re-saving at
another precision (`convert_adapter`, ``qlora export --format peft``) without a model."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import ModuleType

import pytest
import torch

from qlora.adapters import (
    AdapterFormatError,
    convert_adapter,
    load_adapter,
    save_adapter,
)
from qlora.adapters._peft_files import ABSMAX_SUFFIX, decode_int8
from qlora.adapters.peft_format import encode_weights
from qlora.cli import main
from qlora.files import DestinationError
from qlora.models.safetensors_io import SafetensorsReader, write_safetensors
from qlora.nn import lora_layers
from qlora.quant import dequantize_reference, quantize
from tests.adapters.helpers import adapted_llama, logits, max_diff
from tests.tiny_models import tiny_llama

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.fixture
def peft() -> ModuleType:
    return pytest.importorskip("peft")


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with SafetensorsReader(path / WEIGHTS) as reader:
        return {k: reader.get(k).clone() for k in reader.names()}, dict(reader.metadata)


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Module name + A/B -> the loaded LoRA weight (float32)."""
    return {
        f"{name}.{ab}": getattr(layer, f"lora_{ab}")["default"].weight.detach()
        for name, layer in lora_layers(model)
        for ab in "AB"
    }


# -- float precisions: plain PEFT files -------------------------------------------------------


@pytest.mark.compat
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_is_a_plain_peft_file(tmp_path: Path, peft: ModuleType, dtype: str) -> None:
    model = adapted_llama()
    save_adapter(model, tmp_path / "fp32")
    save_adapter(model, tmp_path / dtype, dtype=dtype)  # type: ignore[arg-type]
    tensors, metadata = _read(tmp_path / dtype)
    assert metadata == {"format": "pt"}
    assert {t.dtype for t in tensors.values()} == {getattr(torch, dtype)}
    # the config is exactly float32's: nothing marks a half-precision file
    assert (tmp_path / dtype / CONFIG).read_text() == (tmp_path / "fp32" / CONFIG).read_text()
    reloaded = tiny_llama(seed=0)
    load_adapter(reloaded, tmp_path / dtype)
    for name, weight in _weights(reloaded).items():  # the stored values, widened exactly
        assert weight.dtype == torch.float32
        assert torch.equal(weight, _weights(model)[name].to(getattr(torch, dtype)).float())
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no missing/unexpected-key warnings
        theirs = peft.PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path / dtype)
    assert max_diff(logits(theirs), logits(reloaded)) <= 1e-4
    assert 0 < max_diff(logits(reloaded), logits(model)) <= 0.05  # rounding, small


def test_float16_overflow_is_refused_before_writing(tmp_path: Path) -> None:
    model = adapted_llama()
    layer = next(layer for _, layer in lora_layers(model))
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = 1e5
    with pytest.raises(ValueError, match=r"lora_B\.weight holds values up to 1e\+05.*bfloat16"):
        save_adapter(model, tmp_path / "a", dtype="float16")
    assert not (tmp_path / "a").exists()
    with pytest.raises(ValueError, match="unknown adapter dtype 'int4'"):
        save_adapter(model, tmp_path / "a", dtype="int4")  # type: ignore[arg-type]


# -- int8: the extension ---------------------------------------------------------------------


def test_int8_file_layout(tmp_path: Path) -> None:
    model = adapted_llama()
    save_adapter(model, tmp_path, dtype="int8")
    tensors, metadata = _read(tmp_path)
    assert tensors[KEY].dtype == torch.int8 and tensors[KEY].shape == (4 * 64,)  # A [4, 64]
    assert tensors[KEY + ABSMAX_SUFFIX].dtype == torch.float32
    assert tensors[KEY + ABSMAX_SUFFIX].shape == (4,)  # 256 values / 64
    assert metadata["qlora_adapter_dtype"] == "int8"
    assert metadata["qlora_int8_blocksize"] == "64"
    assert json.loads(metadata["qlora_int8_shapes"])[KEY] == [4, 64]
    assert json.loads((tmp_path / CONFIG).read_text())["qlora_adapter_dtype"] == "int8"
    assert len(tensors) == 2 * 2 * 7 * 2  # (codes, scales) x (A, B) x 7 layers x 2 blocks


def test_int8_decode_is_the_quant_reference_bit_for_bit() -> None:
    """Our encode + decode against `qlora.quant`'s slow int8 reference, with a short block."""
    weights = {"a.lora_A.weight": torch.randn(5, 13) * 0.1, "a.lora_B.weight": torch.randn(3, 64)}
    stored, metadata = encode_weights(weights, "int8")
    decoded = decode_int8(stored, metadata, Path("x"))
    for key, weight in weights.items():
        state = quantize(weight, "int8", 64, double_quant=False, reference=True)
        expected = dequantize_reference(state, torch.float32)
        assert decoded[key].shape == weight.shape
        assert torch.equal(decoded[key], expected)
        assert int(stored[key].min()) >= -127  # code -128 is never written


def test_int8_loads_back_in_ours_close_to_float32(tmp_path: Path) -> None:
    model = adapted_llama()
    save_adapter(model, tmp_path, dtype="int8")
    reloaded = tiny_llama(seed=0)
    load_adapter(reloaded, tmp_path)
    original = _weights(model)
    for name, weight in _weights(reloaded).items():
        assert weight.dtype == torch.float32
        state = quantize(original[name], "int8", 64, double_quant=False, reference=True)
        assert torch.equal(weight, dequantize_reference(state, torch.float32))
    assert 0 < max_diff(logits(reloaded), logits(model)) <= 0.1


@pytest.mark.compat
def test_int8_fails_in_peft_instead_of_loading_garbage(tmp_path: Path, peft: ModuleType) -> None:
    save_adapter(adapted_llama(), tmp_path, dtype="int8")
    size = r"size mismatch.*lora_A.*torch.Size\(\[256\]\)"
    with pytest.raises(RuntimeError, match=size), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about the unknown config key first
        peft.PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path)


def _damage(path: Path, edit: object) -> None:
    """Rewrite the int8 file with ``edit(tensors, metadata)`` applied."""
    tensors, metadata = _read(path)
    edit(tensors, metadata)  # type: ignore[operator]
    (path / WEIGHTS).unlink()
    write_safetensors(path / WEIGHTS, tensors, metadata)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t, m: t.pop(KEY + ABSMAX_SUFFIX), r"q_proj.lora_A.weight' has no .*absmax"),
        (lambda t, m: t.pop(KEY), r"qlora_int8_absmax has no codes tensor"),
        (
            lambda t, m: t.update({KEY + ABSMAX_SUFFIX: torch.ones(3)}),
            r"absmax should hold float32 \[4\], got torch.float32 \[3\]",
        ),
        (
            lambda t, m: t.update({KEY: t[KEY].float()}),
            r"should hold int8 codes \[256\] for shape \[4, 64\], got torch.float32",
        ),
        (
            lambda t, m: t.update({KEY + ABSMAX_SUFFIX: torch.full((4,), float("nan"))}),
            "negative, NaN or inf scales",
        ),
        (lambda t, m: m.pop("qlora_int8_shapes"), "lacks a valid 'qlora_int8_blocksize'"),
        (lambda t, m: m.update(qlora_int8_shapes="[1]"), "lacks a valid"),
        (
            lambda t, m: m.update(qlora_int8_shapes=json.dumps({KEY: [4, "x"]})),
            r"gives .* the shape \[4, 'x'\]",
        ),
        (
            lambda t, m: m.pop("qlora_adapter_dtype"),
            "holds int8 scales but the file's __metadata__",
        ),
    ],
)
def test_a_damaged_int8_file_is_a_one_line_error(
    tmp_path: Path, edit: object, message: str
) -> None:
    save_adapter(adapted_llama(), tmp_path, dtype="int8")
    _damage(tmp_path, edit)
    model = tiny_llama(seed=0)
    before = logits(model)
    with pytest.raises(AdapterFormatError, match=message) as err:
        load_adapter(model, tmp_path)
    assert "\n" not in str(err.value) and str(tmp_path) in str(err.value)
    assert torch.equal(logits(model), before)  # left as it was


def test_int8_codes_without_the_marker_are_named(tmp_path: Path) -> None:
    """Someone's same-shape int8 tensors with no marker must not load as floats."""
    save_adapter(adapted_llama(), tmp_path)
    _damage(tmp_path, lambda t, m: t.update({KEY: t[KEY].to(torch.int8)}))
    with pytest.raises(AdapterFormatError, match=r"q_proj.lora_A is torch.int8, not a float"):
        load_adapter(tiny_llama(seed=0), tmp_path)


def test_an_unknown_precision_in_the_config_is_refused(tmp_path: Path) -> None:
    save_adapter(adapted_llama(), tmp_path)
    config = json.loads((tmp_path / CONFIG).read_text())
    (tmp_path / CONFIG).write_text(json.dumps({**config, "qlora_adapter_dtype": "int4"}))
    with pytest.raises(AdapterFormatError, match="qlora_adapter_dtype='int4' is not a precision"):
        load_adapter(tiny_llama(seed=0), tmp_path)


# -- re-saving at another precision ----------------------------------------------------------


def test_convert_matches_saving_at_that_precision(tmp_path: Path) -> None:
    model = adapted_llama()
    save_adapter(model, tmp_path / "fp32")
    for dtype in ("bfloat16", "float16", "int8"):
        save_adapter(model, tmp_path / f"saved-{dtype}", dtype=dtype)  # type: ignore[arg-type]
        convert_adapter(tmp_path / "fp32", tmp_path / f"conv-{dtype}", dtype)  # type: ignore[arg-type]
        for name in (CONFIG, WEIGHTS):
            assert (tmp_path / f"conv-{dtype}" / name).read_bytes() == (
                tmp_path / f"saved-{dtype}" / name
            ).read_bytes()
    # int8 -> float32: exactly what int8 loads as, and a plain config again
    convert_adapter(tmp_path / "saved-int8", tmp_path / "back", "float32")
    assert "qlora_adapter_dtype" not in json.loads((tmp_path / "back" / CONFIG).read_text())
    a, b = tiny_llama(seed=0), tiny_llama(seed=0)
    load_adapter(a, tmp_path / "saved-int8")
    load_adapter(b, tmp_path / "back")
    assert torch.equal(logits(a), logits(b))


def test_convert_refuses_its_source_and_a_non_empty_directory(tmp_path: Path) -> None:
    save_adapter(adapted_llama(), tmp_path / "a")
    before = (tmp_path / "a" / WEIGHTS).read_bytes()
    with pytest.raises(DestinationError, match="the adapter was loaded from"):
        convert_adapter(tmp_path / "a", tmp_path / "a", "int8", overwrite=True)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("mine")
    with pytest.raises(DestinationError, match="is not empty"):
        convert_adapter(tmp_path / "a", tmp_path / "b", "int8")
    convert_adapter(tmp_path / "a", tmp_path / "b", "int8", overwrite=True)
    assert (tmp_path / "b" / "notes.txt").read_text() == "mine"
    assert (tmp_path / "a" / WEIGHTS).read_bytes() == before


def test_cli_export_peft(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    save_adapter(adapted_llama(), tmp_path / "a")
    argv = ["export", str(tmp_path / "b"), "--format", "peft", "--adapter", str(tmp_path / "a")]
    assert main([*argv, "--adapter-dtype", "int8"]) == 0
    assert "int8" in capsys.readouterr().out
    assert _read(tmp_path / "b")[1]["qlora_adapter_dtype"] == "int8"
    assert main([*argv, "--adapter-dtype", "bfloat16"]) == 2  # b is not empty now
    assert "--overwrite" in capsys.readouterr().err
    assert main([*argv, "--adapter-dtype", "bfloat16", "--overwrite"]) == 0
    assert _read(tmp_path / "b")[0][KEY].dtype == torch.bfloat16
    gguf = ["export", str(tmp_path / "x.gguf"), "--format", "gguf-adapter"]
    assert main([*gguf, "--adapter", str(tmp_path / "a"), "--adapter-dtype", "float16"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--adapter-dtype applies to --format peft only" in err
    assert not (tmp_path / "x.gguf").exists()


# -- training saves the final adapter at train.adapter_dtype ---------------------------------


def test_config_field_checks_its_choices() -> None:
    from qlora.config import ConfigError, TrainConfig, load_run_config

    assert TrainConfig().adapter_dtype == "float32"
    assert load_run_config(None, ["train.adapter_dtype=int8"]).train.adapter_dtype == "int8"
    with pytest.raises(ConfigError, match=r"train\.adapter_dtype.*float32.*int8"):
        TrainConfig(adapter_dtype="int4")  # type: ignore[arg-type]


def test_training_saves_the_adapter_at_its_dtype_and_checkpoints_in_float32(
    tmp_path: Path,
) -> None:
    """Two real steps of the default model (skipped where it cannot be found)."""
    from qlora.config import load_run_config
    from qlora.recipe import run_training
    from tests.default_model import default_model_or_skip, task_train_file

    default_model_or_skip()
    task_train_file(tmp_path, 4)
    overrides = [f"data.path={tmp_path / 'train.jsonl'}", f"train.output_dir={tmp_path / 'run'}"]
    overrides += ["train.max_steps=2", "train.batch_size=2", "train.save_every=1"]
    config = load_run_config(None, [*overrides, "train.adapter_dtype=int8"])
    result = run_training(config, progress=False)
    tensors, metadata = _read(result.adapter_dir)
    assert metadata["qlora_adapter_dtype"] == "int8"
    assert {t.dtype for t in tensors.values()} == {torch.int8, torch.float32}
    with SafetensorsReader(tmp_path / "run" / "checkpoint-1" / "tensors.safetensors") as reader:
        lora = [n for n in reader.names() if "lora_" in n]
        assert lora and {reader.tensors[n].dtype for n in lora} == {torch.float32}


def test_an_int8_adapter_exports_to_gguf_as_its_decoded_values(tmp_path: Path) -> None:
    """Our GGUF adapter export reads int8 through the same reader: the same file as from the
    int8 adapter converted to float32 first."""
    gguf = pytest.importorskip("gguf")
    from qlora.export.gguf_adapter import export_adapter_gguf

    model = adapted_llama()
    save_adapter(model, tmp_path / "int8", dtype="int8")
    convert_adapter(tmp_path / "int8", tmp_path / "fp32", "float32")
    a = export_adapter_gguf(tmp_path / "int8", tmp_path / "a.gguf", model=model)
    b = export_adapter_gguf(tmp_path / "fp32", tmp_path / "b.gguf", model=model)
    tensors_a = {t.name: t.data for t in gguf.GGUFReader(a).tensors}
    tensors_b = {t.name: t.data for t in gguf.GGUFReader(b).tensors}
    assert tensors_a.keys() == tensors_b.keys() and len(tensors_a) == 28
    assert all((tensors_a[k] == tensors_b[k]).all() for k in tensors_a)
