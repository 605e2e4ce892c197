"""BatchingEngine without HTTP: requests join a running batch, one batch mixes adapters and
gives each request its single answer, adapters load and unload next to running requests."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qlora.serve import BatchingEngine, UnknownModelError
from qlora.serve.engine import GenerationRequest, Piece
from tests.export.conftest import tiny_tokenizer
from tests.serve.conftest import make_adapter, make_model, slowed

BASE = "base"
_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def adapter_dirs(tokenizer: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {f"a{i}": make_adapter(tokenizer, root / f"a{i}", seed=10 + i) for i in range(4)}


@pytest.fixture
def engine(tokenizer: Any, adapter_dirs: dict[str, Path]) -> Iterator[BatchingEngine]:
    loaded = {n: str(p) for n, p in adapter_dirs.items() if n != "a3"}  # a3: loaded later
    engine = BatchingEngine(make_model(tokenizer), tokenizer, BASE, loaded, max_batch=4)
    try:
        yield engine
    finally:
        engine.close()


def request(engine: BatchingEngine, model: str, text: str, tokens: int = 12) -> GenerationRequest:
    prompt = engine.encode_chat([{"role": "user", "content": text}])
    return GenerationRequest(model, prompt, max_tokens=tokens, ignore_eos=True)


async def answer(engine: BatchingEngine, req: GenerationRequest) -> str:
    pieces: list[Piece] = [piece async for piece in engine.submit(req)]
    assert pieces[-1].finish_reason == "length" and pieces[-1].completion_tokens == req.max_tokens
    return "".join(p.text for p in pieces)


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout=_TIMEOUT_S))


def alone(engine: BatchingEngine, reqs: list[GenerationRequest]) -> list[str]:
    async def each() -> list[str]:
        return [await answer(engine, r) for r in reqs]

    return run(each())


def test_one_batch_mixes_adapters_and_equals_alone(engine: BatchingEngine) -> None:
    # 6 requests for 4 models (the base twice) in rows of at most 4: some wait for a row.
    names = [BASE, "a0", "a1", "a2", BASE, "a1"]
    reqs = [request(engine, name, f"question {i}", tokens=10 + i) for i, name in enumerate(names)]
    expected = alone(engine, reqs)
    assert engine.stats.peak_batch == 1

    async def together() -> list[str]:
        return list(await asyncio.gather(*(answer(engine, r) for r in reqs)))

    assert run(together()) == expected
    assert engine.stats.peak_batch == 4  # batched, up to max_batch
    assert len(set(expected[:4])) == 4  # the adapters do change the answers


def test_a_request_joins_the_running_batch(engine: BatchingEngine) -> None:
    long, short = request(engine, "a0", "long", 150), request(engine, "a1", "short", 5)
    expected = alone(engine, [long, short])

    async def joined() -> tuple[str, str, bool]:
        start = engine.stats.steps
        first = asyncio.ensure_future(answer(engine, long))
        while engine.stats.steps < start + 3:  # the long request is decoding
            await asyncio.sleep(0.001)
        second = await answer(engine, short)
        running = not first.done()
        return await first, second, running

    with slowed(engine.model):
        got_long, got_short, long_still_running = run(joined())
    assert (got_long, got_short) == tuple(expected)
    assert long_still_running  # the short one did not wait for the long one to finish


def test_hot_load_and_unload_while_a_request_runs(
    engine: BatchingEngine, adapter_dirs: dict[str, Path]
) -> None:
    long = request(engine, "a2", "long", 150)
    expected_long = alone(engine, [long])[0]

    async def around() -> tuple[str, bool]:
        start = engine.stats.steps
        first = asyncio.ensure_future(answer(engine, long))
        while engine.stats.steps < start + 3:
            await asyncio.sleep(0.001)
        await engine.load_adapter("a3", str(adapter_dirs["a3"]))
        await engine.unload_adapter("a2")  # the running request keeps its weights
        loaded_while_running = not first.done()
        return await first, loaded_while_running

    with slowed(engine.model):
        got_long, loaded_while_running = run(around())
    assert got_long == expected_long
    assert loaded_while_running
    assert "a3" in [m.name for m in engine.models()]
    with pytest.raises(UnknownModelError):
        engine.check_model("a2")
    # The hot-loaded adapter answers as the same files do when loaded at start.
    tokenizer = engine.tokenizer
    fresh = BatchingEngine(make_model(tokenizer), tokenizer, BASE, {"a3": str(adapter_dirs["a3"])})
    try:
        req = request(engine, "a3", "hello")
        assert alone(engine, [req]) == alone(fresh, [req])
    finally:
        fresh.close()


def test_a_cancelled_request_frees_its_row(engine: BatchingEngine) -> None:
    async def leave() -> None:
        stream = engine.submit(request(engine, "a0", "long", 150))
        await stream.__anext__()
        await stream.aclose()  # the client is gone

    cancelled = engine.stats.cancelled
    with slowed(engine.model):
        run(leave())
        deadline = asyncio.run(_wait_for(lambda: engine.stats.cancelled > cancelled))
    assert deadline
    assert engine.decoder.rows == 0
    assert engine.stats.cancelled_tokens[-1] < 150


async def _wait_for(condition: Any, seconds: float = 30.0) -> bool:
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while not condition():
        if loop.time() > end:
            return False
        await asyncio.sleep(0.005)
    return True


def test_unsupported_model_is_a_clear_error(tokenizer: Any) -> None:
    import transformers

    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=len(tokenizer))
    with pytest.raises(ValueError, match="batch decoder cannot run this model: model_type 'gpt2'"):
        BatchingEngine(transformers.GPT2LMHeadModel(config), tokenizer, BASE)


def test_default_model_batched_answers_equal_alone(tmp_path: Path) -> None:
    """nf4 default model, 2 adapters and the base in one batch: the greedy tokens of each
    request are those it gets alone (float32 summation order does not flip a token here)."""
    import torch

    from qlora import add_lora, load_model, save_adapter
    from qlora.config import LoraConfig
    from qlora.nn.inject import lora_layers

    model, tokenizer = load_model("smollm2-135m", "nf4")
    paths = {}
    for seed in (1, 2):
        add_lora(model, LoraConfig(r=8, alpha=16.0), adapter_name="tmp")
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B.tmp" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
        paths[f"s{seed}"] = str(save_adapter(model, tmp_path / f"s{seed}", adapter="tmp"))
        for _, layer in lora_layers(model):
            layer.delete_adapter("tmp")
    engine = BatchingEngine(model, tokenizer, "smol", paths, max_batch=4)
    try:
        questions = ["Name three colors.", "What is 2+2?", "Say hi.", "Give a fruit."]
        reqs = [
            request(engine, name, q, tokens=24)
            for name, q in zip(["smol", "s1", "s2", "s1"], questions, strict=True)
        ]
        expected = alone(engine, reqs)

        async def together() -> list[str]:
            return list(await asyncio.gather(*(answer(engine, r) for r in reqs)))

        assert run(together()) == expected
        assert engine.stats.peak_batch == 4
        assert expected[1] != alone(engine, [request(engine, "smol", questions[1], 24)])[0]
    finally:
        engine.close()
