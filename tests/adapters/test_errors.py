"""Bad adapter files: each gets a one-line error naming the file and key, and the model is left
exactly as it was (no layer wrapped, no adapter half-added)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from qlora.adapters import AdapterFormatError, AdapterNotFoundError, load_adapter, save_adapter
from qlora.models.safetensors_io import write_safetensors
from tests.adapters.helpers import adapted_llama
from tests.tiny_models import tiny_llama

Q_PROJ = "model.layers.0.self_attn.q_proj"
Q_A = f"base_model.model.{Q_PROJ}.lora_A.weight"


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("adapter")
    save_adapter(adapted_llama(), directory)
    return directory


def _copy(saved: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    target.mkdir()
    for path in saved.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def _edit_config(directory: Path, **changes: object) -> None:
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _edit_weights(directory: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    from safetensors.torch import load_file

    path = directory / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    write_safetensors(path, tensors)


def _fails(directory: Path, error: type[Exception], pattern: str, **kwargs: object) -> str:
    model = tiny_llama(seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=pattern) as info:
        load_adapter(model, directory, **kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    return message


def test_missing_directory_and_files(saved: Path, tmp_path: Path) -> None:
    _fails(tmp_path / "nowhere", AdapterNotFoundError, r"nowhere does not exist")
    directory = _copy(saved, tmp_path)
    (directory / "adapter_model.safetensors").rename(directory / "adapter_model.bin")
    _fails(directory, AdapterNotFoundError, r"adapter_model.safetensors is missing.*\.bin")
    (directory / "adapter_config.json").unlink()
    _fails(directory, AdapterNotFoundError, r"adapter_config.json is missing")
    parent = tmp_path / "multi"
    (parent / "b").mkdir(parents=True)
    (parent / "b" / "adapter_config.json").write_text("{}")
    _fails(parent, AdapterNotFoundError, r"holds adapters in b: pass .*multi/<name>")


@pytest.mark.parametrize(
    ("changes", "pattern"),
    [
        ({"peft_type": "IA3"}, r"peft_type is 'IA3'; only LoRA"),
        ({"use_dora": True}, r"use_dora is true but .*lora_magnitude_vector is missing"),
        ({"modules_to_save": ["lm_head"]}, r"modules_to_save=\['lm_head'\] is not supported"),
        ({"lora_bias": True}, r"lora_bias=True is not supported"),
        ({"init_lora_weights": "olora"}, r"init_lora_weights='olora' changes the base"),
        ({"init_lora_weights": "pissa_niter_x"}, r"expected \"pissa\" or \"pissa_niter_<n>\""),
        ({"r": 0}, r"r must be a positive integer, got 0"),
        ({"rank_pattern": {"q_proj(": 2}}, r"rank_pattern key 'q_proj\(' is not a valid regex"),
        ({"r": 8}, r"down_proj.lora_A.weight has rank 4 \(shape \[4, 128\]\) but .* r=8"),
        ({"rank_pattern": {"q_proj": 2}}, r"q_proj.lora_A.weight has rank 4 .* gives r=2"),
    ],
)
def test_bad_config(saved: Path, tmp_path: Path, changes: dict, pattern: str) -> None:
    directory = _copy(saved, tmp_path)
    _edit_config(directory, **changes)
    message = _fails(directory, AdapterFormatError, pattern)
    assert str(directory / "adapter_config.json") in message or "safetensors" in message


def test_invalid_json(saved: Path, tmp_path: Path) -> None:
    directory = _copy(saved, tmp_path)
    (directory / "adapter_config.json").write_text("{not json")
    _fails(directory, AdapterFormatError, r"adapter_config.json: not valid JSON")


def test_key_for_a_module_the_model_lacks(saved: Path, tmp_path: Path) -> None:
    directory = _copy(saved, tmp_path)
    _edit_weights(directory, lambda t: t.update({Q_A.replace("layers.0", "layers.9"): t[Q_A]}))
    _fails(
        directory,
        AdapterFormatError,
        r"key '.*layers\.9\.self_attn\.q_proj\.lora_A\.weight' names .* no Linear layer of "
        r"this model .*another model\?",
    )


def test_key_that_is_not_lora(saved: Path, tmp_path: Path) -> None:
    directory = _copy(saved, tmp_path)
    extra = "base_model.model.model.layers.0.self_attn.q_proj.lora_embedding_A"
    _edit_weights(directory, lambda t: t.update({extra: torch.ones(4, 64)}))
    _fails(directory, AdapterFormatError, r"lora_embedding_A' is not a lora_A/lora_B weight")


def test_dora_magnitude_in_a_plain_lora_file(saved: Path, tmp_path: Path) -> None:
    directory = _copy(saved, tmp_path)
    extra = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    _edit_weights(directory, lambda t: t.update({extra: torch.ones(64)}))
    _fails(directory, AdapterFormatError, r"is a DoRA magnitude, but adapter_config.json has no")


def test_missing_b_weight(saved: Path, tmp_path: Path) -> None:
    directory = _copy(saved, tmp_path)
    _edit_weights(directory, lambda t: t.pop(Q_A.replace("lora_A", "lora_B")))
    _fails(directory, AdapterFormatError, r"'model.layers.0.self_attn.q_proj' has no lora_B")


def test_layer_size_differs_from_base(saved: Path, tmp_path: Path) -> None:
    model = tiny_llama(seed=0, intermediate=96)
    with pytest.raises(
        AdapterFormatError, match=r"down_proj.lora_A.weight has shape \[4, 128\] .* 96 inputs"
    ):
        load_adapter(model, saved)
    assert not any("lora" in k for k in model.state_dict())


def test_corrupt_weights_file(saved: Path, tmp_path: Path) -> None:
    directory = _copy(saved, tmp_path)
    path = directory / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    _fails(directory, AdapterFormatError, r"adapter_model.safetensors")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_a_corrupt_adapter(
    saved: Path, tmp_path: Path, value: float
) -> None:
    """A diverged training saves NaN; loading it must say so, not fail later as NaN logits."""
    directory = _copy(saved, tmp_path)
    q_b = Q_A.replace("lora_A", "lora_B")

    def poison(tensors: dict[str, torch.Tensor]) -> None:
        tensors[q_b][3, 1] = value

    _edit_weights(directory, poison)
    message = _fails(directory, AdapterFormatError, r"NaN/inf values; the adapter is corrupt")
    assert str(directory / "adapter_model.safetensors") in message and q_b in message


def test_name_taken_or_invalid(saved: Path) -> None:
    model = tiny_llama(seed=0)
    load_adapter(model, saved)
    with pytest.raises(ValueError, match=r"already has an adapter 'default'; pass another name="):
        load_adapter(model, saved)
    with pytest.raises(ValueError, match=r"without '\.'"):
        load_adapter(model, saved, name="a.b")
    assert model.get_submodule(Q_PROJ).adapter_names == ["default"]


def test_save_unknown_adapter(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"no adapter 'x'; it has \['default'\]"):
        save_adapter(adapted_llama(), tmp_path, adapter="x")
    with pytest.raises(ValueError, match=r"no adapter 'default'; it has none"):
        save_adapter(tiny_llama(seed=0), tmp_path)
    assert list(tmp_path.iterdir()) == []
