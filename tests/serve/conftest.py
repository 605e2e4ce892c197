"""A tiny random Llama served by `qlora serve`'s app on 127.0.0.1 (ephemeral port), adapters
with large random B (so they change the answer), and reference models to compare with."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.export.conftest import tiny_tokenizer
from tests.tiny_models import tiny_llama

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

CONTEXT = 512  # the tiny model's context: small, so overflow is easy to ask for
BASE = "tiny-base"


def make_model(tokenizer: Any) -> torch.nn.Module:
    """The same random tiny Llama every time (seed 0)."""
    return tiny_llama(seed=0, vocab=len(tokenizer), max_position_embeddings=CONTEXT)


def make_adapter(tokenizer: Any, directory: Path, seed: int) -> Path:
    """A rank-4 adapter on every linear with B drawn large, saved as PEFT files."""
    from qlora import add_lora, save_adapter
    from qlora.config import LoraConfig

    model = make_model(tokenizer)
    add_lora(model, LoraConfig(r=4, alpha=8.0, dropout=0.0))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return save_adapter(model, directory)


def reference(tokenizer: Any, adapter: Path | None = None) -> torch.nn.Module:
    """A separate model to compute expected answers with `qlora.generate` (never served)."""
    from qlora import load_adapter

    model = make_model(tokenizer)
    if adapter is not None:
        load_adapter(model, adapter)
    return model


def running(app: Any) -> contextlib.AbstractContextManager[str]:
    """Serves ``app`` on 127.0.0.1:<free port> in a thread; yields the base URL."""
    from qlora.serve.app import serve_in_thread

    return serve_in_thread(app)


@dataclass
class Served:
    url: str
    engine: Any
    tokenizer: Any
    adapters: dict[str, Path]


@pytest.fixture(scope="module", params=["batching", "sequential"])
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    """The base plus adapter "alpha" (on the model before start); "beta" is on disk, not
    loaded; served by each engine in turn."""
    from qlora import load_adapter
    from qlora.serve import BatchingEngine, SequentialEngine
    from qlora.serve.app import create_app

    tokenizer = tiny_tokenizer()
    root = tmp_path_factory.mktemp("adapters")
    adapters = {n: make_adapter(tokenizer, root / n, s) for n, s in [("alpha", 1), ("beta", 2)]}
    model = make_model(tokenizer)
    load_adapter(model, adapters["alpha"], name="alpha")
    if request.param == "batching":
        engine: Any = BatchingEngine(model, tokenizer, BASE, max_batch=4)
    else:
        engine = SequentialEngine(model, tokenizer, BASE)
    try:
        with running(create_app(engine)) as url:
            yield Served(url, engine, tokenizer, adapters)
    finally:
        engine.close()


@contextlib.contextmanager
def slowed(model: Any, seconds: float = 0.004) -> Iterator[None]:
    """Every decode step of ``model`` takes ``seconds`` longer (a hook on its embedding, which
    every engine calls once per step): a long generation then outlasts what a test does
    meanwhile (a client giving up, a hot-load, a short request), however fast decoding is."""
    embedding = model.get_input_embeddings()
    handle = embedding.register_forward_hook(lambda *_: time.sleep(seconds))
    try:
        yield
    finally:
        handle.remove()
