"""`qlora serve`: an OpenAI-compatible HTTP server over one base model and named adapters.

``protocol`` (OpenAI's request/response shapes), ``errors`` (HTTP status per error),
``decode`` (token loop and text pieces), ``engine`` (`Engine`, the interface; `SequentialEngine`,
one request at a time through the model's own forward), ``batching`` (`BatchingEngine`:
continuous batching, batches mixing adapters, hot-loading; the default), ``app`` (the FastAPI
app and `run_server`). FastAPI and uvicorn are the ``serve`` extra:
``pip install "qlora[serve]"``.
"""

from qlora.serve.batching import DEFAULT_MAX_BATCH, BatchingEngine
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
    "DEFAULT_MAX_BATCH",
    "AdapterLoadError",
    "AuthenticationError",
    "BadRequestError",
    "BatchingEngine",
    "ContextLengthError",
    "Engine",
    "GenerationRequest",
    "ModelInfo",
    "Piece",
    "SequentialEngine",
    "ServeError",
    "UnknownModelError",
]
