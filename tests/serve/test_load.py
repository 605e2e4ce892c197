"""A bounded load test of `qlora serve`: 32 concurrent clients x 4 requests over the base and
4 adapters, half of them streamed. No errors, no lost request, every answer (text, finish
reason, usage) equal to the same request's answer when it was sent alone, p50/p95 printed.

Served by `BatchingEngine` with max_batch 8, so 32 clients keep the batch full and rows
for different adapters (and the base) share every decode step while requests join and leave.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.export.conftest import tiny_tokenizer
from tests.serve.conftest import BASE, make_adapter, make_model, running

httpx = pytest.importorskip("httpx")

CLIENTS = 32
ROUNDS = 4  # requests per client, one after another
ADAPTERS = [f"load-{i}" for i in range(4)]
MODELS = [BASE, *ADAPTERS]
PROMPTS = ["hello", "the quick brown", "lazy dog", "hello there", "fox jumps"]
MAX_TOKENS = 8
MAX_BATCH = 8
TOTAL_TIMEOUT_S = 120.0  # per phase (solo answers, load): the test fails rather than hangs


@dataclass(frozen=True)
class Answer:
    text: str
    finish_reason: str | None
    usage: dict[str, int]
    seconds: float  # from sending the request to its last byte


@pytest.fixture(scope="module")
def load_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any]]:
    """(base URL, engine): the tiny base plus 4 adapters (seeds 11..14), loaded at start."""
    from qlora.serve import BatchingEngine
    from qlora.serve.app import create_app

    tokenizer = tiny_tokenizer()
    root = tmp_path_factory.mktemp("load-adapters")
    adapters = {
        name: str(make_adapter(tokenizer, root / name, seed))
        for seed, name in enumerate(ADAPTERS, start=11)
    }
    engine = BatchingEngine(make_model(tokenizer), tokenizer, BASE, adapters, max_batch=MAX_BATCH)
    try:
        with running(create_app(engine)) as url:
            yield url, engine
    finally:
        engine.close()


def request_of(client: int, round_: int) -> tuple[str, str, bool]:
    """(model, prompt, stream) of a client's round: every model and prompt, half streamed."""
    index = client * ROUNDS + round_
    return MODELS[client % len(MODELS)], PROMPTS[index % len(PROMPTS)], index % 2 == 0


def body(model: str, prompt: str, stream: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "model": model,
        "prompt": prompt,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": stream,
    }
    if stream:
        out["stream_options"] = {"include_usage": True}
    return out


async def complete(http: Any, model: str, prompt: str, stream: bool) -> Answer:
    """One /v1/completions request, streamed (SSE) or not, read to its end."""
    start = time.perf_counter()
    if not stream:
        response = await http.post("/v1/completions", json=body(model, prompt, False))
        assert response.status_code == 200, response.text
        data = response.json()
        choice = data["choices"][0]
        return Answer(
            choice["text"], choice["finish_reason"], data["usage"], time.perf_counter() - start
        )
    parts: list[str] = []
    finish, usage, done = None, None, False
    async with http.stream("POST", "/v1/completions", json=body(model, prompt, True)) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if not line:
                continue
            assert line.startswith("data: ") and not done, f"unexpected SSE line {line!r}"
            payload = line.removeprefix("data: ")
            if payload == "[DONE]":
                done = True
                continue
            chunk = json.loads(payload)
            assert "error" not in chunk, f"error event mid-stream: {chunk}"
            for choice in chunk["choices"]:
                parts.append(choice["text"])
                finish = choice["finish_reason"] or finish
            usage = chunk.get("usage") or usage
    assert done and usage is not None, "the stream ended without its usage chunk or [DONE]"
    return Answer("".join(parts), finish, usage, time.perf_counter() - start)


async def solo_answers(url: str) -> dict[tuple[str, str], Answer]:
    """Every (model, prompt)'s answer, each request sent alone (one at a time)."""

    async def each(http: Any) -> dict[tuple[str, str], Answer]:
        return {(m, p): await complete(http, m, p, False) for m in MODELS for p in PROMPTS}

    async with httpx.AsyncClient(base_url=url, timeout=30.0) as http:
        return await asyncio.wait_for(each(http), TOTAL_TIMEOUT_S)


async def load(url: str) -> list[list[Answer]]:
    """CLIENTS concurrent clients, each sending its ROUNDS requests one after another."""
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=url, timeout=60.0, limits=limits) as http:

        async def one_client(client: int) -> list[Answer]:
            return [await complete(http, *request_of(client, round_)) for round_ in range(ROUNDS)]

        clients = [one_client(c) for c in range(CLIENTS)]
        return await asyncio.wait_for(asyncio.gather(*clients), TOTAL_TIMEOUT_S)


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def test_32_clients_x_4_requests_get_their_single_answers(load_server: tuple[str, Any]) -> None:
    url, engine = load_server
    solo = asyncio.run(solo_answers(url))
    # Each adapter must change the answer somewhere, or the test could not see a mix-up.
    for adapter in ADAPTERS:
        assert any(solo[(adapter, p)].text != solo[(BASE, p)].text for p in PROMPTS), adapter

    finished, cancelled = engine.stats.finished, engine.stats.cancelled
    start = time.perf_counter()
    answers = asyncio.run(load(url))
    wall = time.perf_counter() - start

    assert sum(len(a) for a in answers) == CLIENTS * ROUNDS
    assert engine.stats.finished - finished == CLIENTS * ROUNDS
    assert engine.stats.cancelled == cancelled
    wrong = []
    for client, rounds in enumerate(answers):
        for round_, got in enumerate(rounds):
            model, prompt, stream = request_of(client, round_)
            expected = solo[(model, prompt)]
            prompt_tokens = len(engine.encode_text(prompt))
            usage = got.usage
            assert usage["prompt_tokens"] == prompt_tokens, (model, prompt, usage)
            assert 1 <= usage["completion_tokens"] <= MAX_TOKENS, (model, prompt, usage)
            assert usage["total_tokens"] == prompt_tokens + usage["completion_tokens"], usage
            if (got.text, got.finish_reason, got.usage) != (
                expected.text,
                expected.finish_reason,
                expected.usage,
            ):
                wrong.append((model, prompt, stream, expected, got))
    assert not wrong, f"{len(wrong)} answers differ from the solo answer; first: {wrong[0]}"

    latencies = sorted(a.seconds for rounds in answers for a in rounds)
    tokens = sum(a.usage["completion_tokens"] for rounds in answers for a in rounds)
    print(
        f"\n{type(engine).__name__}: {CLIENTS} clients x {ROUNDS} requests in {wall:.2f} s "
        f"({tokens / wall:.0f} completion tok/s); latency p50 {percentile(latencies, 50):.3f} s, "
        f"p95 {percentile(latencies, 95):.3f} s, max {latencies[-1]:.3f} s"
    )


def test_request_plan_covers_every_model_prompt_and_both_modes() -> None:
    plan = [request_of(c, r) for c in range(CLIENTS) for r in range(ROUNDS)]
    assert {m for m, _, _ in plan} == set(MODELS)
    assert {p for _, p, _ in plan} == set(PROMPTS)
    assert sum(s for _, _, s in plan) == len(plan) // 2
