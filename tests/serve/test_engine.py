"""The engine without HTTP: the decode loop against `generate_text` (also on an nf4 base),
sampling against transformers' warpers, and the text assembler's stops and characters."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch

from qlora.generate import generate_text
from qlora.serve.decode import TextAssembler, sample_next
from qlora.serve.engine import GenerationRequest, Piece, SequentialEngine
from tests.export.conftest import tiny_tokenizer
from tests.serve.conftest import make_model

HELLO = [{"role": "user", "content": "hello world"}]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return tiny_tokenizer()


def run(engine: SequentialEngine, request: GenerationRequest) -> list[Piece]:
    async def collect() -> list[Piece]:
        return [piece async for piece in engine.submit(request)]

    return asyncio.run(asyncio.wait_for(collect(), timeout=60))


def test_nf4_base_greedy_equals_generate_text(tokenizer: Any) -> None:
    from qlora import quantize_model
    from qlora.config import QuantConfig

    model = quantize_model(make_model(tokenizer), QuantConfig(kind="nf4"))
    engine = SequentialEngine(model, tokenizer, "nf4")
    try:
        prompt = engine.encode_chat(HELLO)
        pieces = run(engine, GenerationRequest("nf4", prompt, max_tokens=24))
    finally:
        engine.close()
    expected = generate_text(model, tokenizer, HELLO, max_new_tokens=24)
    assert "".join(p.text for p in pieces) == expected
    assert pieces[-1].finish_reason in ("stop", "length")
    assert pieces[-1].prompt_tokens == len(prompt)


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 0.9), (0.7, 0.5), (1.3, 1.0)])
def test_sampling_keeps_transformers_nucleus(temperature: float, top_p: float) -> None:
    """Every token we can draw is one transformers' temperature + top-p warpers keep."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    logits = torch.randn(50, generator=torch.Generator().manual_seed(0)) * 3  # [V]
    warped = TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(temperature)(None, logits[None]))
    allowed = set(torch.nonzero(torch.isfinite(warped[0])).flatten().tolist())
    generator = torch.Generator().manual_seed(1)
    drawn = {sample_next(logits, temperature, top_p, generator) for _ in range(400)}
    assert drawn <= allowed
    assert len(drawn) >= min(len(allowed), 2)
    assert sample_next(logits, 0.0, top_p, generator) == int(torch.argmax(logits))


def test_stop_string_across_tokens_is_never_sent(tokenizer: Any) -> None:
    ids = tokenizer("hello world, hello there", add_special_tokens=False)["input_ids"]
    text = TextAssembler(tokenizer, stops=("o there",))
    sent = ""
    for token in ids:
        sent += text.add(token)
        if text.stopped:
            break
    sent += text.finish()
    assert text.stopped and sent == "hello world, hell"


def test_half_characters_are_held_back(tokenizer: Any) -> None:
    ids = tokenizer("héllo ✓", add_special_tokens=False)["input_ids"]
    text = TextAssembler(tokenizer)
    pieces = [text.add(token) for token in ids] + [text.finish()]
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == "héllo ✓"
