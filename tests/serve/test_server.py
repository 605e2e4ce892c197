"""`qlora serve` over HTTP, driven by the official `openai` client and raw `httpx`."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from qlora.generate import generate_text
from tests.serve.conftest import BASE, CONTEXT, Served, reference, running, slowed

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

TIMEOUT = 30.0
HELLO = [{"role": "user", "content": "hello world"}]


def client(served: Served, key: str = "unused") -> Any:
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key=key, timeout=TIMEOUT, max_retries=0)


def chat(served: Served, model: str = BASE, **kwargs: Any) -> Any:
    kwargs.setdefault("max_tokens", 12)
    kwargs.setdefault("temperature", 0)
    return client(served).chat.completions.create(model=model, messages=HELLO, **kwargs)


def post(served: Served, path: str, body: Any, timeout: float = TIMEOUT) -> Any:
    return httpx.post(f"{served.url}{path}", json=body, timeout=timeout)


def error_of(response: Any) -> dict[str, Any]:
    """The OpenAI error object of a failed response (checks its shape)."""
    error = response.json()["error"]
    assert set(error) == {"message", "type", "code"} and error["message"]
    return error


# -- answers ------------------------------------------------------------------------------------


def test_models_lists_base_and_adapters(served: Served) -> None:
    ids = [m.id for m in client(served).models.list().data]
    assert ids == [BASE, "alpha"]
    assert httpx.get(f"{served.url}/health", timeout=TIMEOUT).json() == {"status": "ok"}


def test_chat_greedy_equals_generate_text(served: Served) -> None:
    """The server's decode loop gives `generate_text`'s (transformers' generate) answer."""
    answer = chat(served, max_tokens=16)
    expected = generate_text(
        reference(served.tokenizer), served.tokenizer, HELLO, max_new_tokens=16
    )
    assert answer.choices[0].message.content == expected
    assert answer.choices[0].finish_reason in ("stop", "length")
    prompt = served.engine.encode_chat(HELLO)
    assert answer.usage.prompt_tokens == len(prompt)
    assert 1 <= answer.usage.completion_tokens <= 16
    assert answer.usage.total_tokens == len(prompt) + answer.usage.completion_tokens


def test_completion_is_the_raw_continuation(served: Served) -> None:
    answer = client(served).completions.create(
        model=BASE, prompt="the quick brown", max_tokens=10, temperature=0
    )
    expected = generate_text(
        reference(served.tokenizer),
        served.tokenizer,
        [{"role": "user", "content": "the quick brown"}],
        max_new_tokens=10,
        raw=True,
    )
    assert answer.choices[0].text == expected
    assert answer.object == "text_completion"


def test_adapter_changes_the_answer(served: Served) -> None:
    with_adapter = chat(served, model="alpha", max_tokens=16).choices[0].message.content
    base = chat(served, max_tokens=16).choices[0].message.content
    assert with_adapter != base
    ref = reference(served.tokenizer, served.adapters["alpha"])
    assert with_adapter == generate_text(ref, served.tokenizer, HELLO, max_new_tokens=16)


@pytest.mark.parametrize("model", [BASE, "alpha"])
def test_stream_concatenates_to_the_answer(served: Served, model: str) -> None:
    whole = chat(served, model=model, max_tokens=20)
    chunks = list(chat(served, model=model, max_tokens=20, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_completion_stream_with_usage(served: Served) -> None:
    kwargs: dict[str, Any] = {"model": BASE, "prompt": "hello", "max_tokens": 8, "temperature": 0}
    whole = client(served).completions.create(**kwargs)
    chunks = list(
        client(served).completions.create(
            stream=True, stream_options={"include_usage": True}, **kwargs
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage is not None and chunks[-1].usage == whole.usage


def test_raw_sse_ends_with_done(served: Served) -> None:
    body = {"model": BASE, "prompt": "hello", "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{served.url}/v1/completions", json=body, timeout=TIMEOUT) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[0].removeprefix("data: "))["object"] == "text_completion"


def test_stop_string_cuts_the_answer(served: Served) -> None:
    text = chat(served, max_tokens=20).choices[0].message.content
    stop = text[4:6]
    assert len(stop) == 2, f"the greedy answer is too short to pick a stop from: {text!r}"
    answer = chat(served, max_tokens=20, stop=[stop])
    assert answer.choices[0].message.content == text[: text.find(stop)]
    assert answer.choices[0].finish_reason == "stop"
    streamed = chat(served, max_tokens=20, stop=stop, stream=True)
    assert (
        "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
        == (text[: text.find(stop)])
    )


def test_seeded_sampling_repeats(served: Served) -> None:
    first = chat(served, temperature=1.0, top_p=0.9, seed=7, max_tokens=12)
    again = chat(served, temperature=1.0, top_p=0.9, seed=7, max_tokens=12)
    assert first.choices[0].message.content == again.choices[0].message.content


# -- adapters -----------------------------------------------------------------------------------


def test_hot_load_and_unload(served: Served) -> None:
    loaded = post(
        served,
        "/v1/load_lora_adapter",
        {"lora_name": "beta", "lora_path": str(served.adapters["beta"])},
    )
    assert loaded.status_code == 200, loaded.text
    try:
        assert [m.id for m in client(served).models.list().data] == [BASE, "alpha", "beta"]
        beta = chat(served, model="beta", max_tokens=16).choices[0].message.content
        ref = reference(served.tokenizer, served.adapters["beta"])
        assert beta == generate_text(ref, served.tokenizer, HELLO, max_new_tokens=16)
        again = post(served, "/v1/load_lora_adapter", {"lora_name": "beta", "lora_path": "x"})
        assert again.status_code == 400 and "already in use" in error_of(again)["message"]
    finally:
        unloaded = post(served, "/v1/unload_lora_adapter", {"lora_name": "beta"})
    assert unloaded.status_code == 200, unloaded.text
    with pytest.raises(openai.NotFoundError):
        chat(served, model="beta")
    assert [m.id for m in client(served).models.list().data] == [BASE, "alpha"]
    gone = post(served, "/v1/unload_lora_adapter", {"lora_name": "beta"})
    assert gone.status_code == 404 and error_of(gone)["code"] == "model_not_found"


def test_a_bad_adapter_is_400_and_the_server_keeps_serving(served: Served, tmp_path: Any) -> None:
    before = chat(served, model="alpha").choices[0].message.content
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{not json")
    for path in [tmp_path / "missing", broken]:
        response = post(
            served, "/v1/load_lora_adapter", {"lora_name": "bad", "lora_path": str(path)}
        )
        assert response.status_code == 400, response.text
        assert str(path) in error_of(response)["message"]
    assert [m.id for m in client(served).models.list().data] == [BASE, "alpha"]
    assert chat(served, model="alpha").choices[0].message.content == before


# -- errors -------------------------------------------------------------------------------------


def test_unknown_model_is_404(served: Served) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        chat(served, model="nope")
    assert caught.value.status_code == 404
    raw = post(served, "/v1/completions", {"model": "nope", "prompt": "hi"})
    assert raw.status_code == 404 and error_of(raw)["code"] == "model_not_found"


@pytest.mark.parametrize(
    ("body", "culprit"),
    [
        ({"model": BASE, "messages": HELLO, "n": 2}, "n"),
        ({"model": BASE, "messages": HELLO, "temperature": 5}, "temperature"),
        ({"model": BASE, "messages": HELLO, "max_tokens": 0}, "max_tokens"),
        ({"model": BASE, "messages": []}, "messages"),
        ({"model": BASE}, "messages"),
        ({"model": BASE, "messages": [{"role": "wizard", "content": "x"}]}, "role"),
        ({"model": BASE, "messages": [{"role": "system", "content": "x"}]}, "user message"),
    ],
)
def test_bad_fields_are_400(served: Served, body: dict[str, Any], culprit: str) -> None:
    response = post(served, "/v1/chat/completions", body)
    assert response.status_code == 400, response.text
    assert culprit in error_of(response)["message"]


def test_n_above_one_through_the_client(served: Served) -> None:
    with pytest.raises(openai.BadRequestError):
        chat(served, n=2)


def test_malformed_json_is_400(served: Served) -> None:
    response = httpx.post(
        f"{served.url}/v1/chat/completions",
        content=b'{"model": "x", "messages": [',
        headers={"content-type": "application/json"},
        timeout=TIMEOUT,
    )
    assert response.status_code == 400
    assert "JSON" in error_of(response)["message"]


def test_context_overflow_is_400(served: Served) -> None:
    prompt = len(served.engine.encode_chat(HELLO))
    fits = chat(served, max_tokens=CONTEXT - prompt, stop=["\x00"]).choices  # exactly full
    assert fits
    response = post(
        served,
        "/v1/chat/completions",
        {"model": BASE, "messages": HELLO, "max_tokens": CONTEXT - prompt + 1},
    )
    assert response.status_code == 400
    assert error_of(response)["code"] == "context_length_exceeded"
    long = post(served, "/v1/completions", {"model": BASE, "prompt": "hello " * CONTEXT})
    assert long.status_code == 400 and error_of(long)["code"] == "context_length_exceeded"


def test_unknown_route_is_404_in_openai_shape(served: Served) -> None:
    response = httpx.get(f"{served.url}/v1/nothing", timeout=TIMEOUT)
    assert response.status_code == 404
    error_of(response)


def test_api_key(served: Served) -> None:
    from qlora.serve.app import create_app

    with running(create_app(served.engine, api_key="s3cret")) as url:
        keyed = Served(url, served.engine, served.tokenizer, served.adapters)
        for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}]:
            response = httpx.get(f"{url}/v1/models", headers=headers, timeout=TIMEOUT)
            assert response.status_code == 401
            assert error_of(response)["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            client(keyed, key="wrong").models.list()
        assert client(keyed, key="s3cret").models.list().data[0].id == BASE
        assert httpx.get(f"{url}/health", timeout=TIMEOUT).status_code == 200


# -- disconnects and load -----------------------------------------------------------------------


def test_disconnect_mid_stream_stops_generation(served: Served) -> None:
    stats = served.engine.stats
    cancelled = stats.cancelled
    body = {
        "model": BASE,
        "prompt": "hello",
        "max_tokens": CONTEXT - 8,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    with slowed(served.engine.model):
        with httpx.stream(
            "POST", f"{served.url}/v1/completions", json=body, timeout=TIMEOUT
        ) as response:
            lines = response.iter_lines()
            for _ in range(3):  # a few chunks, then hang up
                next(lines)
        deadline = time.monotonic() + 20
        while stats.cancelled == cancelled:
            assert time.monotonic() < deadline, "the generation was not cancelled"
            time.sleep(0.02)
    assert stats.cancelled_tokens[-1] < CONTEXT - 8
    assert chat(served).choices  # and the server goes on serving


def test_concurrent_clients_get_their_single_answers(served: Served) -> None:
    """8 clients x 2 requests over the base and an adapter: no errors, the solo answers."""
    from concurrent.futures import ThreadPoolExecutor

    models = [BASE, "alpha"]
    prompts = ["hello", "the quick", "lazy dog", "hello there"]
    solo = {
        (m, p): client(served)
        .completions.create(model=m, prompt=p, max_tokens=8, temperature=0)
        .choices[0]
        .text
        for m in models
        for p in prompts
    }

    def one_client(index: int) -> list[bool]:
        api = client(served)
        results = []
        for round_ in range(2):
            model, prompt = models[(index + round_) % 2], prompts[index % 4]
            answer = api.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
            results.append(answer.choices[0].text == solo[(model, prompt)])
        return results

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(one_client, range(8), timeout=120))
    assert all(all(r) for r in outcomes)


def test_disconnect_while_waiting_stops_generation(served: Served) -> None:
    stats = served.engine.stats
    cancelled = stats.cancelled
    body = {"model": BASE, "prompt": "hello", "max_tokens": CONTEXT - 8, "ignore_eos": True}
    with slowed(served.engine.model):  # until the cancel: the generation would outlast the wait
        with pytest.raises(httpx.ReadTimeout):  # the client gives up long before the answer
            post(served, "/v1/completions", body, timeout=0.3)
        deadline = time.monotonic() + 20
        while stats.cancelled == cancelled:
            assert time.monotonic() < deadline, "the generation was not cancelled"
            time.sleep(0.02)
    assert stats.cancelled_tokens[-1] < CONTEXT - 8
