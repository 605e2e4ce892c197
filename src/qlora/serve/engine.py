"""The engine behind the server: one loaded base model, named adapters, requests in, text out.

`Engine` is the interface the HTTP layer uses and nothing more: ``submit`` a request and
iterate its text pieces; ``load_adapter`` / ``unload_adapter`` by name; ``models`` lists what a
request may name; ``encode_chat`` / ``encode_text`` give the prompt ids (training's encoding,
`qlora.generate.prompt_tensor`) so the HTTP layer can check the context before queueing.

Two engines implement it. `BatchingEngine` (`qlora.serve.batching`, the default) runs
continuous batching on `qlora.models.batch_decode.BatchDecoder`: requests join the running
batch at the next step, one batch mixes adapters, adapters load next to running requests.
`SequentialEngine` (here) serves ONE request at a time through the model's own forward, for
architectures the batch decoder does not know: requests, adapter loads and unloads all go
through a single worker thread in arrival order, and a request's adapter is activated with
`qlora.set_adapter` just before it runs (the base alone: no adapter active).

In both, a request whose consumer stops iterating (a client that disconnected mid-stream) is
cancelled before its next token, or skipped if still queued; `Reply` turns a request's tokens
into `Piece`s the same way (EOS, stop strings, max_tokens, incremental text).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch
from torch import nn

from qlora.adapters import load_adapter as _load_adapter_files
from qlora.data.records import DataError
from qlora.generate import prompt_tensor
from qlora.nn.inject import lora_layers, set_adapter
from qlora.serve.decode import TextAssembler, eos_ids, token_stream
from qlora.serve.errors import AdapterLoadError, BadRequestError, UnknownModelError

__all__ = [
    "Engine",
    "EngineBase",
    "EngineStats",
    "GenerationRequest",
    "ModelInfo",
    "Piece",
    "Reply",
    "SequentialEngine",
    "adapter_load_error",
    "request_generator",
]

_T = TypeVar("_T")


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate: the model or adapter name, the prompt ids [T], and the settings."""

    model: str
    prompt: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False


@dataclass(frozen=True)
class Piece:
    """A piece of generated text; the last piece of a request has ``finish_reason`` set
    ("stop": EOS or a stop string; "length": max_tokens reached) and the token counts."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class ModelInfo:
    """A name a request may use: the base (``parent`` None) or an adapter on it."""

    name: str
    parent: str | None = None
    path: str | None = None


class Engine(Protocol):
    """What the HTTP layer needs from an engine (sequential today, batching next)."""

    base_name: str
    context_length: int

    def models(self) -> list[ModelInfo]: ...

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]: ...

    def encode_text(self, text: str) -> list[int]: ...

    def check_model(self, name: str) -> None: ...

    def submit(self, request: GenerationRequest) -> AsyncIterator[Piece]: ...

    async def load_adapter(self, name: str, path: str) -> None: ...

    async def unload_adapter(self, name: str) -> None: ...

    def close(self) -> None: ...


@dataclass
class EngineStats:
    """Counters for health checks and tests."""

    finished: int = 0
    cancelled: int = 0
    # Batching only: decoder steps run, and the most rows one step has carried.
    steps: int = 0
    peak_batch: int = 0
    # Tokens each cancelled request had generated when it stopped (bounded: the last 64).
    cancelled_tokens: list[int] = field(default_factory=list)


def _context_length(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    length = getattr(config, "max_position_embeddings", None)
    if not isinstance(length, int) or length <= 0:
        raise ValueError("the model's config has no max_position_embeddings: unknown context")
    return length


Push = Callable[["Piece | BaseException"], None]


class Reply:
    """One request's tokens -> the `Piece`s to send: text as it becomes final (no half
    characters, nothing of a stop string), then a last piece with the finish reason and the
    token counts ("stop": EOS or a stop string; "length": max_tokens reached)."""

    def __init__(self, tokenizer: Any, request: GenerationRequest, stop_ids: frozenset[int]):
        self._request = request
        self._stop_ids = frozenset() if request.ignore_eos else stop_ids
        self._text = TextAssembler(tokenizer, request.stop)
        self.tokens = 0
        self.finished = False

    def add(self, token: int) -> Piece | None:
        """The piece ``token`` completes, if any; the last one has ``finish_reason`` set."""
        self.tokens += 1
        finish = None
        if token in self._stop_ids:
            piece, finish = "", "stop"
        else:
            piece = self._text.add(token)
            if self._text.stopped:
                finish = "stop"
            elif self.tokens >= self._request.max_tokens:
                finish = "length"
        if finish is None:
            return Piece(piece) if piece else None
        self.finished = True
        rest = piece + self._text.finish()
        return Piece(rest, finish, len(self._request.prompt), self.tokens)


def request_generator(request: GenerationRequest) -> torch.Generator:
    """The request's own random stream: its seed, or a fresh one."""
    generator = torch.Generator()
    if request.seed is not None:
        generator.manual_seed(request.seed)
    else:
        generator.seed()
    return generator


class EngineBase:
    """What both engines share: names, prompts, stats, and ``submit``'s bridge from the
    worker thread's pushes to the request's async iterator."""

    def __init__(self, model: nn.Module, tokenizer: Any, base_name: str) -> None:
        if not base_name:
            raise ValueError("the base model needs a non-empty name")
        self.model = model
        self.tokenizer = tokenizer
        self.base_name = base_name
        self.context_length = _context_length(model)
        self.stats = EngineStats()
        self._stop_ids = eos_ids(model, tokenizer)
        self._adapters: dict[str, str | None] = {}  # name -> directory (None: came on the model)

    def models(self) -> list[ModelInfo]:
        """The base first, then every loaded adapter."""
        adapters = [ModelInfo(n, self.base_name, p) for n, p in sorted(self._adapters.items())]
        return [ModelInfo(self.base_name), *adapters]

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Prompt ids [T] for the reply to ``messages`` (chat template or plain template)."""
        try:
            return prompt_tensor(self.tokenizer, messages)[0].tolist()
        except (DataError, ValueError) as err:
            raise BadRequestError(f"messages: {err}") from None

    def encode_text(self, text: str) -> list[int]:
        """Prompt ids [T] of ``text`` as it is (no template, no special tokens)."""
        try:
            return prompt_tensor(self.tokenizer, [{"role": "user", "content": text}], raw=True)[
                0
            ].tolist()
        except ValueError as err:
            raise BadRequestError(f"prompt: {err}") from None

    def check_model(self, name: str) -> None:
        """Raises UnknownModelError unless ``name`` is the base or a loaded adapter."""
        if name != self.base_name and name not in self._adapters:
            known = [m.name for m in self.models()]
            raise UnknownModelError(f"model {name!r} does not exist; this server has {known}")

    def _check_free(self, name: str) -> None:
        if name == self.base_name or name in self._adapters:
            raise AdapterLoadError(f"lora_name {name!r} is already in use; unload it first")

    def _check_loaded(self, name: str) -> None:
        if name not in self._adapters:
            loaded = sorted(self._adapters)
            raise UnknownModelError(f"no adapter {name!r} is loaded; loaded: {loaded}")

    def _reply(self, request: GenerationRequest) -> Reply:
        return Reply(self.tokenizer, request, self._stop_ids)

    def _count_cancelled(self, tokens: int) -> None:
        self.stats.cancelled += 1
        self.stats.cancelled_tokens = [*self.stats.cancelled_tokens[-63:], tokens]

    def _start(self, request: GenerationRequest, push: Push, cancel: threading.Event) -> None:
        """Queues ``request`` on the worker, which pushes its pieces (or an error)."""
        raise NotImplementedError

    async def submit(self, request: GenerationRequest) -> AsyncIterator[Piece]:
        """The request's text pieces as they are generated; stopping the iteration (or
        cancelling the task iterating it) cancels the request before its next token."""
        self.check_model(request.model)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Piece | BaseException] = asyncio.Queue()
        cancel = threading.Event()

        def push(item: Piece | BaseException) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        self._start(request, push, cancel)
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    break
        finally:
            cancel.set()
            self._cancelled()

    def _cancelled(self) -> None:
        """Called when a request's consumer is done (finished, gone or failed)."""


class SequentialEngine(EngineBase):
    """Serves requests one at a time on ``model`` (with adapters by name), in arrival order.

    Args:
        model: a causal LM from `qlora.load_model` (any adapters already on it are served
            under their names).
        tokenizer: its tokenizer (prompts are encoded as training encoded them).
        base_name: the name requests use for the base model without adapters.
        adapters: adapter name -> PEFT directory, loaded now.

    Raises:
        AdapterLoadError: an adapter name is taken or its files do not load.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        base_name: str,
        adapters: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(model, tokenizer, base_name)
        self._adapters = {
            name: None for _, layer in lora_layers(model) for name in layer.adapter_names
        }
        # One worker: requests and adapter changes run one after another, in arrival order.
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="qlora-serve")
        for name, path in (adapters or {}).items():
            self._check_free(name)
            self._load(name, str(path))

    # -- requests --------------------------------------------------------------------------

    def _start(self, request: GenerationRequest, push: Push, cancel: threading.Event) -> None:
        self._worker.submit(self._run, request, push, cancel)

    def _run(self, request: GenerationRequest, push: Push, cancel: threading.Event) -> None:
        """On the worker thread: the whole request, pushing pieces as they come."""
        if cancel.is_set():  # its client left while it waited in the queue
            self._count_cancelled(0)
            return
        try:
            self.check_model(request.model)  # it may have been unloaded while queued
            set_adapter(self.model, [] if request.model == self.base_name else [request.model])
            self._generate(request, push, cancel)
        except Exception as err:  # handed to the waiting request, raised there
            push(err)

    def _generate(self, request: GenerationRequest, push: Push, cancel: threading.Event) -> None:
        reply = self._reply(request)
        for token in token_stream(
            self.model,
            request.prompt,
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            generator=request_generator(request),
            stop_ids=frozenset(),  # the reply decides where it ends
            cancelled=cancel.is_set,
        ):
            piece = reply.add(token)
            if piece is not None:
                push(piece)
            if reply.finished:
                self.stats.finished += 1
                return
        self._count_cancelled(reply.tokens)

    # -- adapters --------------------------------------------------------------------------

    async def load_adapter(self, name: str, path: str) -> None:
        """Loads the PEFT adapter at ``path`` as ``name`` (after the requests ahead of it).

        Raises:
            AdapterLoadError: the name is taken or invalid, or the files are missing or do not
                fit the model (the model is left as it was).
        """
        self._check_free(name)
        await self._on_worker(self._load, name, path)

    def _load(self, name: str, path: str) -> None:
        try:
            _load_adapter_files(self.model, path, name=name)
        except (OSError, ValueError) as err:
            raise adapter_load_error(name, path, err) from None
        self._adapters[name] = path

    async def unload_adapter(self, name: str) -> None:
        """Removes adapter ``name`` from every layer (after the requests ahead of it).

        Raises:
            UnknownModelError: no adapter of that name is loaded.
        """
        self._check_loaded(name)
        await self._on_worker(self._unload, name)

    def _unload(self, name: str) -> None:
        self._check_loaded(name)
        del self._adapters[name]
        for _, layer in lora_layers(self.model):
            if name in layer.lora_A:
                layer.delete_adapter(name)

    async def _on_worker(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    def close(self) -> None:
        """Stops the worker; queued requests are dropped."""
        self._worker.shutdown(wait=False, cancel_futures=True)


def adapter_load_error(name: str, path: str, err: BaseException) -> AdapterLoadError:
    """The one-line 400 for an adapter that does not load."""
    message = str(err).splitlines()[0] if str(err) else type(err).__name__
    return AdapterLoadError(f"cannot load adapter {name!r} from {path}: {message}")
