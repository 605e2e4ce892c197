"""`qlora.generate` on the batch decoder: greedy tokens equal transformers' ``generate`` on the
default model (nf4 and fp32, with and without an active adapter), the fallback to
``generate`` for what the batch decoder does not run, streaming, stop ids and sampling."""

from __future__ import annotations

import contextlib
import io
from typing import Any

import pytest
import torch

from qlora.config import LoraConfig
from qlora.generate import (
    DecodePlan,
    _TextStream,
    decode_plan,
    generate_ids,
    generate_text,
    prompt_tensor,
    stop_ids,
)
from qlora.models import REGISTRY, ModelLoadError, load_model
from qlora.nn import add_lora, disable_adapters, fast_decoding, lora_layers, set_adapter
from qlora.nn.lora import merge_adapter

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

try:
    REGISTRY["smollm2-135m"].locate()
except ModelLoadError as err:
    pytest.skip(str(err), allow_module_level=True)

NEW_TOKENS = 32
QUESTIONS = (
    "Write a short poem about the sea at night.",
    "Explain what a hash table is.",
    "List four ways to save energy at home.",
)


@pytest.fixture(scope="module", params=["nf4", "fp32"])
def default_model(request: pytest.FixtureRequest) -> tuple[torch.nn.Module, Any]:
    return load_model("smollm2-135m", None if request.param == "fp32" else "nf4", progress=False)


def _prompt(tok: Any, question: str) -> list[int]:
    return prompt_tensor(tok, [{"role": "user", "content": question}])[0].tolist()


def _hf_greedy(
    model: torch.nn.Module, prompt: list[int], fast: bool = True, max_new_tokens: int = NEW_TOKENS
) -> list[int]:
    """transformers' ``generate``, greedy, stopping on the generation config's EOS; ``fast``:
    inside fast_decoding (what generate_text ran before the batch decoder)."""
    ids = torch.tensor([prompt])  # [1, T]
    with torch.no_grad(), fast_decoding() if fast else contextlib.nullcontext():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, ids.shape[1] :].tolist()


def _randomize_b(model: torch.nn.Module, name: str, seed: int, std: float = 0.01) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            weight = layer.lora_B[name].weight  # [out, r]
            weight.copy_(torch.randn(weight.shape, generator=generator) * std)


def test_greedy_tokens_equal_transformers_generate(default_model: tuple[Any, Any]) -> None:
    model, tok = default_model
    assert decode_plan(model) == DecodePlan(None)
    prompts = [_prompt(tok, q) for q in QUESTIONS]
    ours = generate_ids(model, prompts, max_new_tokens=NEW_TOKENS, stop=stop_ids(model, tok))
    for prompt, tokens in zip(prompts, ours, strict=True):
        assert tokens == _hf_greedy(model, prompt)
    assert max(len(t) for t in ours) >= 32
    # The public entry: the same reply as text, one prompt at a time.
    messages = [{"role": "user", "content": QUESTIONS[0]}]
    reply = generate_text(model, tok, messages, max_new_tokens=NEW_TOKENS)
    assert reply == tok.decode(ours[0], skip_special_tokens=True)


def test_active_adapter_equals_the_composed_forward() -> None:
    model, tok = load_model("smollm2-135m", "nf4", progress=False)
    add_lora(model, LoraConfig(r=8, alpha=16.0, dropout=0.05))  # dropout: eval mode ignores it
    _randomize_b(model, "default", seed=0, std=0.03)
    plan = decode_plan(model)
    assert plan.reason is None and plan.adapter is not None and len(plan.adapter) == 30 * 7
    prompts = [_prompt(tok, QUESTIONS[0])]  # one: the composed forward dequantizes per token
    ours = generate_ids(model, prompts, max_new_tokens=NEW_TOKENS, stop=stop_ids(model, tok))
    assert ours == [_hf_greedy(model, p, fast=False) for p in prompts]  # LoRALinear's forward
    assert len(ours[0]) == NEW_TOKENS
    with torch.no_grad():
        adapted = model(torch.tensor(prompts[:1])).logits[0, -1]  # [V]
    with disable_adapters(model):  # disabled: the base alone, still on the batch decoder
        assert decode_plan(model) == DecodePlan(None)
        plain = generate_ids(model, prompts, max_new_tokens=8, stop=stop_ids(model, tok))
        assert plain == [_hf_greedy(model, p, max_new_tokens=8) for p in prompts]
        with torch.no_grad():
            base = model(torch.tensor(prompts[:1])).logits[0, -1]
    assert float((adapted - base).abs().max()) > 0.5  # the adapter is not a no-op


def test_unsupported_states_fall_back_to_generate() -> None:
    model, tok = load_model("smollm2-135m", "nf4", progress=False)
    add_lora(model, LoraConfig(r=8, dropout=0.0))
    add_lora(model, LoraConfig(r=8, dropout=0.0), adapter_name="other")
    _randomize_b(model, "default", seed=0)
    _randomize_b(model, "other", seed=1)
    set_adapter(model, ["default", "other"])
    assert "several adapters" in str(decode_plan(model).reason)
    prompt = _prompt(tok, QUESTIONS[1])
    [ours] = generate_ids(model, [prompt], max_new_tokens=8, stop=stop_ids(model, tok))
    assert ours == _hf_greedy(model, prompt, max_new_tokens=8)
    set_adapter(model, "default")
    assert decode_plan(model).reason is None
    layer = next(layer for _, layer in lora_layers(model))
    layer.disabled = True
    assert "some of its layers only" in str(decode_plan(model).reason)
    layer.disabled = False
    merge_adapter(layer)
    assert "merged" in str(decode_plan(model).reason)


def test_unsupported_architecture_falls_back_to_generate() -> None:
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    assert "gpt2" in str(decode_plan(model).reason)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    streamed: list[tuple[int, int]] = []
    ours = generate_ids(
        model, prompts, max_new_tokens=6, stop=(), on_token=lambda i, t: streamed.append((i, t))
    )
    for prompt, tokens in zip(prompts, ours, strict=True):
        with torch.no_grad():
            ids = torch.tensor([prompt])
            out = model.generate(ids, max_new_tokens=6, do_sample=False, min_new_tokens=6)
        assert tokens == out[0, len(prompt) :].tolist()
    assert streamed == [(i, t) for i, tokens in enumerate(ours) for t in tokens]


def test_stream_is_the_reply_token_by_token(default_model: tuple[Any, Any]) -> None:
    model, tok = default_model
    writes: list[str] = []

    class Recording(io.StringIO):
        def write(self, text: str) -> int:
            writes.append(text)
            return len(text)

    messages = [{"role": "user", "content": QUESTIONS[2]}]
    reply = generate_text(model, tok, messages, max_new_tokens=16, stream=Recording())
    assert "".join(writes) == reply + "\n"
    assert len(writes) > 8  # token by token, not at the end


def test_stream_never_splits_a_utf8_character(default_model: tuple[Any, Any]) -> None:
    _, tok = default_model
    text = "naïve café: 日本語 🎉 done"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.split())  # some characters span several byte-level tokens
    out = io.StringIO()
    pieces: list[str] = []
    stream = _TextStream(tok, out)
    for token in ids:
        before = out.getvalue()
        stream.add(token)
        pieces.append(out.getvalue()[len(before) :])
    stream.finish()
    assert all("\ufffd" not in piece for piece in pieces)
    assert out.getvalue() == text + "\n"


def test_sampling_is_reproducible_with_torch_manual_seed(default_model: tuple[Any, Any]) -> None:
    model, tok = default_model
    messages = [{"role": "user", "content": "Tell me a story."}]

    def sample(seed: int) -> str:
        torch.manual_seed(seed)
        return generate_text(model, tok, messages, max_new_tokens=12, temperature=1.0, top_p=0.9)

    first = sample(1)
    assert sample(1) == first
    assert any(sample(seed) != first for seed in (2, 3, 4))


def test_stop_ids_are_the_tokenizer_and_generation_config_eos(
    default_model: tuple[Any, Any],
) -> None:
    model, tok = default_model
    assert stop_ids(model, tok) == {tok.eos_token_id}
    model.generation_config.eos_token_id = [tok.eos_token_id, 0]
    try:
        assert stop_ids(model, tok) == {tok.eos_token_id, 0}
    finally:
        model.generation_config.eos_token_id = tok.eos_token_id


def test_prompt_beyond_the_context_is_a_clear_error(default_model: tuple[Any, Any]) -> None:
    model, _ = default_model
    context = model.config.max_position_embeddings
    with pytest.raises(ValueError, match="beyond the model's context"):
        generate_ids(model, [[1] * (context + 1)], max_new_tokens=1, stop=())
