"""`qlora serve`: an OpenAI-compatible HTTP server over one base model and named adapters.

``protocol`` (OpenAI's request/response shapes), ``errors`` (HTTP status per error),
``decode`` (one request's token loop), ``engine`` (`Engine`, the interface; `SequentialEngine`,
one request at a time), ``app`` (the FastAPI app and `run_server`). FastAPI and uvicorn are
the ``serve`` extra: ``pip install "qlora[serve]"``.

Not done yet (issue 16): continuous batching, batches that mix adapters, loading adapters
without waiting for running requests, the fast k-bit decode path.
"""

from qlora.serve.engine import Engine, GenerationRequest, ModelInfo, Piece, SequentialEngine
from qlora.serve.errors import (
    AdapterLoadError,
    AuthenticationError,
    BadRequestError,
    ContextLengthError,
    ServeError,
    UnknownModelError,
)

__all__ = [
    "AdapterLoadError",
    "AuthenticationError",
    "BadRequestError",
    "ContextLengthError",
    "Engine",
    "GenerationRequest",
    "ModelInfo",
    "Piece",
    "SequentialEngine",
    "ServeError",
    "UnknownModelError",
]
