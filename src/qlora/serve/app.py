"""The HTTP layer: an OpenAI-compatible FastAPI app over an `Engine` (vLLM's server is the
interface reference).

Endpoints: ``GET /health``; ``GET /v1/models``; ``POST /v1/chat/completions`` and
``POST /v1/completions`` (``stream`` true/false: SSE ``data: {...}`` chunks then
``data: [DONE]``); ``POST /v1/load_lora_adapter`` ``{lora_name, lora_path}`` and
``POST /v1/unload_lora_adapter`` ``{lora_name}`` (vLLM's names). Every error is OpenAI's
``{"error": {"message", "type", "code"}}``: 400 for malformed JSON or a bad field (FastAPI's
422 is turned into 400), a prompt plus max_tokens beyond the context, or an adapter that cannot
be loaded; 401 for a missing or wrong ``Authorization: Bearer`` key when one is set; 404 for an
unknown model or route. A client that disconnects mid-stream cancels its generation.

A client that disconnects while waiting for a non-streamed answer cancels it too (checked
every 0.1 s). Not supported: ``n`` > 1, logprobs, echo, penalties (refused with a 400).
Loading adapters by path over HTTP is what vLLM offers too: bind to 127.0.0.1 (the default)
or set an API key before exposing the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from qlora.serve.engine import Engine, GenerationRequest, Piece
from qlora.serve.errors import AuthenticationError, ContextLengthError, ServeError
from qlora.serve.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    LoadLoraAdapterRequest,
    ModelCard,
    ModelList,
    UnloadLoraAdapterRequest,
    Usage,
    new_id,
)

__all__ = ["ClientGone", "create_app", "error_body", "run_server", "serve_in_thread"]

_DISCONNECT_POLL_S = 0.1  # how often a non-streamed request checks that its client is there


class ClientGone(Exception):
    """The client disconnected before its answer was complete (nobody reads the response)."""


def error_body(message: str, type_: str, code: str | int | None) -> dict[str, Any]:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": type_, "code": code}}


def _error(status: int, message: str, type_: str, code: str | int | None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, code), status_code=status)


def _validation_message(err: RequestValidationError) -> str:
    """One line naming the first bad field and what is wrong with it."""
    first = err.errors()[0] if err.errors() else {}
    if first.get("type") == "json_invalid":
        return f"the body is not valid JSON: {first.get('ctx', {}).get('error', 'parse error')}"
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return f"{where}: {message}"


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServeError)
    async def _serve_error(_: Request, err: ServeError) -> JSONResponse:
        return _error(err.status, str(err), err.type, err.code)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(_: Request, err: RequestValidationError) -> JSONResponse:
        return _error(400, _validation_message(err), "invalid_request_error", "invalid_value")

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, err: HTTPException) -> JSONResponse:
        return _error(err.status_code, str(err.detail), "invalid_request_error", err.status_code)

    @app.exception_handler(ClientGone)
    async def _gone(_: Request, err: ClientGone) -> JSONResponse:
        # 499 (nginx's "client closed request"): logged, never read.
        return _error(499, "the client disconnected", "invalid_request_error", "client_gone")

    @app.exception_handler(Exception)
    async def _server_error(_: Request, err: Exception) -> JSONResponse:
        return _error(500, f"internal error: {type(err).__name__}: {err}", "server_error", None)


def _auth(api_key: str | None) -> Any:
    """A dependency that checks ``Authorization: Bearer <api_key>`` (nothing when no key)."""

    async def check(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), api_key.encode()
        ):
            raise AuthenticationError("missing or wrong API key: send 'Authorization: Bearer KEY'")

    return Depends(check)


def _generation(engine: Engine, body: Any, prompt: list[int]) -> GenerationRequest:
    """The engine request for ``body``; a prompt that leaves no room is a 400."""
    room = engine.context_length - len(prompt)
    if room <= 0:
        raise ContextLengthError(
            f"the prompt ({len(prompt)} tokens) fills the model's context of "
            f"{engine.context_length} tokens: shorten the prompt"
        )
    max_tokens = body.max_tokens if body.max_tokens is not None else room
    if max_tokens > room:
        raise ContextLengthError(
            f"the prompt ({len(prompt)} tokens) plus max_tokens ({max_tokens}) exceeds the "
            f"model's context of {engine.context_length} tokens: shorten the prompt or lower "
            "max_tokens"
        )
    return GenerationRequest(
        model=body.model,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        stop=body.stop_list(),
        seed=body.seed,
        ignore_eos=body.ignore_eos,
    )


async def _collect(engine: Engine, request: GenerationRequest) -> tuple[str, Piece]:
    """The whole answer and its last piece (finish reason, counts)."""
    parts: list[str] = []
    last = Piece("")
    async with contextlib.aclosing(engine.submit(request)) as pieces:
        async for piece in pieces:
            parts.append(piece.text)
            last = piece
    return "".join(parts), last


async def _collect_unless_gone(
    http: Request, engine: Engine, request: GenerationRequest
) -> tuple[str, Piece]:
    """`_collect`, cancelled when the client disconnects before the answer is complete
    (checked every `_DISCONNECT_POLL_S`; cancelling closes the engine's iterator)."""
    task = asyncio.ensure_future(_collect(engine, request))
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await http.is_disconnected():
                raise ClientGone
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, ServeError):
                await task


def _usage(piece: Piece) -> Usage:
    total = piece.prompt_tokens + piece.completion_tokens
    return Usage(
        prompt_tokens=piece.prompt_tokens,
        completion_tokens=piece.completion_tokens,
        total_tokens=total,
    )


def _sse(model: BaseModel | dict[str, Any]) -> str:
    data = model if isinstance(model, dict) else model.model_dump(exclude_none=False)
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _sse_stream(
    engine: Engine, request: GenerationRequest, chunk: Any, include_usage: bool
) -> AsyncIterator[str]:
    """SSE lines: ``chunk(text, finish_reason)`` per piece, a usage chunk if asked, [DONE].

    A client that disconnects ends this generator (cancelled, or closed on a failed send);
    ``aclosing`` then closes the engine's iterator, which cancels the generation.
    """
    try:
        async with contextlib.aclosing(engine.submit(request)) as pieces:
            async for piece in pieces:
                if piece.text or piece.finish_reason:
                    yield _sse(chunk(piece.text, piece.finish_reason, None))
                if piece.finish_reason and include_usage:
                    yield _sse(chunk(None, None, _usage(piece)))
    except ServeError as err:  # after the headers went out: the error travels as an event
        yield _sse(error_body(str(err), err.type, err.code))
    yield "data: [DONE]\n\n"


def _chat_chunker(request_id: str, model: str) -> Any:
    def chunk(text: str | None, finish: str | None, usage: Usage | None) -> ChatCompletionChunk:
        if usage is not None:
            return ChatCompletionChunk(id=request_id, model=model, choices=[], usage=usage)
        delta = DeltaMessage(content=text or None)
        choice = ChatChunkChoice(delta=delta, finish_reason=finish)
        return ChatCompletionChunk(id=request_id, model=model, choices=[choice])

    return chunk


def _completion_chunker(request_id: str, model: str) -> Any:
    def chunk(text: str | None, finish: str | None, usage: Usage | None) -> CompletionChunk:
        if usage is not None:
            return CompletionChunk(id=request_id, model=model, choices=[], usage=usage)
        choice = CompletionChoice(text=text or "", finish_reason=finish)
        return CompletionChunk(id=request_id, model=model, choices=[choice])

    return chunk


def _stream_response(lines: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(lines, media_type="text/event-stream")


def _role_chunk(request_id: str, model: str) -> str:
    """The first chat chunk: the assistant role, no content (as OpenAI sends it)."""
    choice = ChatChunkChoice(delta=DeltaMessage(role="assistant", content=""))
    return _sse(ChatCompletionChunk(id=request_id, model=model, choices=[choice]))


async def _prefixed(first: str, rest: AsyncIterator[str]) -> AsyncIterator[str]:
    yield first
    async with contextlib.aclosing(rest) as lines:  # type: ignore[type-var]
        async for line in lines:
            yield line


def _add_generation_routes(app: FastAPI, engine: Engine, auth: Any) -> None:
    @app.post("/v1/chat/completions", dependencies=[auth])
    async def chat_completions(body: ChatCompletionRequest, http: Request) -> Any:
        engine.check_model(body.model)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        request = _generation(engine, body, engine.encode_chat(messages))
        request_id = new_id("chatcmpl")
        if body.stream:
            chunk = _chat_chunker(request_id, body.model)
            lines = _sse_stream(engine, request, chunk, body.include_usage())
            return _stream_response(_prefixed(_role_chunk(request_id, body.model), lines))
        text, last = await _collect_unless_gone(http, engine, request)
        message = ChatMessage(role="assistant", content=text)
        choice = ChatChoice(message=message, finish_reason=last.finish_reason)
        return ChatCompletionResponse(
            id=request_id, model=body.model, choices=[choice], usage=_usage(last)
        )

    @app.post("/v1/completions", dependencies=[auth])
    async def completions(body: CompletionRequest, http: Request) -> Any:
        engine.check_model(body.model)
        request = _generation(engine, body, engine.encode_text(body.prompt_text()))
        request_id = new_id("cmpl")
        if body.stream:
            chunk = _completion_chunker(request_id, body.model)
            return _stream_response(_sse_stream(engine, request, chunk, body.include_usage()))
        text, last = await _collect_unless_gone(http, engine, request)
        choice = CompletionChoice(text=text, finish_reason=last.finish_reason)
        return CompletionResponse(
            id=request_id, model=body.model, choices=[choice], usage=_usage(last)
        )


def _add_admin_routes(app: FastAPI, engine: Engine, auth: Any) -> None:
    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models", dependencies=[auth])
    async def models() -> ModelList:
        cards = [
            ModelCard(id=m.name, root=m.path or m.name, parent=m.parent) for m in engine.models()
        ]
        return ModelList(data=cards)

    @app.post("/v1/load_lora_adapter", dependencies=[auth])
    async def load_lora_adapter(body: LoadLoraAdapterRequest) -> dict[str, str]:
        await engine.load_adapter(body.lora_name, body.lora_path)
        return {"status": "ok", "message": f"loaded adapter {body.lora_name!r}"}

    @app.post("/v1/unload_lora_adapter", dependencies=[auth])
    async def unload_lora_adapter(body: UnloadLoraAdapterRequest) -> dict[str, str]:
        await engine.unload_adapter(body.lora_name)
        return {"status": "ok", "message": f"unloaded adapter {body.lora_name!r}"}


def create_app(engine: Engine, *, api_key: str | None = None) -> FastAPI:
    """The OpenAI-compatible app over ``engine``; with ``api_key``, every ``/v1`` route needs
    ``Authorization: Bearer <api_key>`` (``/health`` stays open for probes)."""
    if api_key is not None and not api_key:
        raise ValueError("api_key must be non-empty (or None for no key)")
    app = FastAPI(title="qlora serve", docs_url=None, redoc_url=None, openapi_url=None)
    _install_error_handlers(app)
    auth = _auth(api_key)
    _add_admin_routes(app, engine, auth)
    _add_generation_routes(app, engine, auth)
    return app


def run_server(
    engine: Engine, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None
) -> None:
    """Serves ``engine`` with uvicorn until interrupted, then closes the engine."""
    import uvicorn

    try:
        uvicorn.run(create_app(engine, api_key=api_key), host=host, port=port, log_level="info")
    finally:
        engine.close()


_STARTUP_S = 20.0
_SHUTDOWN_S = 10.0


@contextlib.contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1") -> Iterator[str]:
    """Serves ``app`` with uvicorn in a background thread on ``host``:<a free port> and
    yields its base URL (``http://127.0.0.1:PORT``); stops it on exit. For tests, benchmarks
    and notebooks: the server lives as long as the ``with`` block.

    Raises:
        RuntimeError: the server did not start within 20 s.
    """
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + _STARTUP_S
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            server.should_exit = True
            sock.close()
            raise RuntimeError(f"the server on {host}:{port} did not start")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(_SHUTDOWN_S)
        sock.close()
